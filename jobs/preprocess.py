"""Preprocess a corpus on Ray Data: `ray job submit --working-dir . -- python jobs/preprocess.py --config CONFIG.yaml`.

The same as `mtnlg preprocess CONFIG.yaml`; joins the cluster of RAY_ADDRESS (set by `ray job
submit`), or starts a local Ray. Prints the dataset directory it wrote.
"""

import argparse
import sys

from mtnlg_ray.config import PreprocessJob, load_job
from mtnlg_ray.data.shards import run_preprocess
from mtnlg_ray.errors import UserError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="PreprocessJob YAML (jobs/configs/preprocess/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = parser.parse_args()
    try:
        out = run_preprocess(load_job(args.config, PreprocessJob, args.set))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
