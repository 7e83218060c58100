"""Every cluster file validates with Ray's own code, not a hand-written schema.

- clusters/*.yaml: `prepare_config` + `validate_config`, what `ray up` runs before it talks to a
  cloud (defaults merged, then Ray's ray-schema.json and its cross-field checks).
- clusters/kuberay/: the RayCluster (and the RayService's cluster) go through the translation the
  in-tree KubeRay autoscaler itself runs on the custom resource; the RayService's serveConfigV2
  through Serve's ServeDeploySchema and Serve's own typed-builder call of our build_app; the
  RayJob's entrypoint through our config loader.
- The GPU worker ranges match the elastic `scaling.num_workers: [min, max]` of the pretraining
  config they are sized for (gpt-1.3b.yaml), in nodes of 8 GPUs: max_workers (maxReplicas) = max / 8,
  min = min / 8 on-prem (cloud types and KubeRay groups scale from 0: the job waits for its min);
  and every cluster file's comments name that config and its range as the config writes it.
"""

import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.schema import ServeDeploySchema
from ray._common.utils import import_attr

from mtnlg_ray.config import PretrainJob, ServeJob, load_job

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = sorted((ROOT / "clusters").glob("*.yaml"))
KUBERAY = ROOT / "clusters" / "kuberay"
SIZED_FOR = ROOT / "mtnlg_ray" / "configs" / "pretrain" / "gpt-1.3b.yaml"  # named in every cluster file's comments
GPUS_PER_NODE = 8


def launcher_config(path: Path) -> dict:
    """The config as `ray up` sees it after its offline steps; raises on anything Ray rejects."""
    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)
    return config


def gpu_range() -> tuple[int, int]:
    """(min, max) GPUs the sized-for pretraining config asks for."""
    s = load_job(SIZED_FOR, PretrainJob).scaling
    lo, hi = (s.num_workers, s.num_workers) if isinstance(s.num_workers, int) else s.num_workers
    per = (s.gpus_per_worker or 1) if s.use_gpu else 0
    return lo * per, hi * per


def comments(path: Path) -> str:
    """The comment text of a YAML file, lines joined by spaces."""
    return " ".join(line.split("#", 1)[1].strip() for line in path.read_text().splitlines() if "#" in line)


def makefile_torch() -> str:
    return re.search(r"torch==[\w.+]+", (ROOT / "Makefile").read_text()).group(0)


def test_there_are_three_launcher_configs():
    assert [p.name for p in CLUSTERS] == ["aws.yaml", "gcp.yaml", "onprem.yaml"]


def test_sized_for_an_elastic_range_of_whole_nodes_that_every_cluster_file_names():
    lo, hi = gpu_range()
    assert lo < hi and lo % GPUS_PER_NODE == 0 and hi % GPUS_PER_NODE == 0  # elastic, in whole nodes
    workers = list(load_job(SIZED_FOR, PretrainJob).scaling.num_workers)
    words = f"`scaling.num_workers: {workers}` of mtnlg_ray/configs/pretrain/{SIZED_FOR.name}"
    for path in CLUSTERS + [KUBERAY / "raycluster.yaml"]:
        assert words in comments(path), path.name


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_launcher_config_validates_with_ray(path):
    config = launcher_config(path)
    assert config["idle_timeout_minutes"] > 0 and config["upscaling_speed"] > 0
    # Installed the README's way: the Makefile's torch pin first, then the synced project.
    setup = "\n".join(config["setup_commands"])
    assert setup.index(f"pip install -q {makefile_torch()}") < setup.index("pip install -q -e ~/mtnlg_ray")
    assert config["file_mounts"] == {"/home/ubuntu/mtnlg_ray": "."}


def test_ray_validator_rejects_a_misspelled_key(tmp_path):
    bad = tmp_path / "aws.yaml"
    bad.write_text((ROOT / "clusters" / "aws.yaml").read_text().replace("idle_timeout_minutes:", "idle_timeout_minute:"))
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        launcher_config(bad)


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_gpu_node_types_match_the_elastic_worker_range(name):
    config = launcher_config(ROOT / "clusters" / name)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = {k: v for k, v in types.items() if v["resources"].get("GPU")}
    accelerators = {r for v in gpu_types.values() for r in v["resources"] if r.startswith("accelerator_type:")}
    assert accelerators == {"accelerator_type:A100", "accelerator_type:H100"}
    lo, hi = gpu_range()
    for node_type in gpu_types.values():
        assert node_type["resources"]["GPU"] == GPUS_PER_NODE
        # Scale from zero; up to exactly the nodes the config's max worker count fills.
        assert node_type["min_workers"] == 0 and node_type["max_workers"] * GPUS_PER_NODE == hi
        assert lo <= node_type["max_workers"] * GPUS_PER_NODE
    assert config["max_workers"] == sum(t.get("max_workers", 0) for k, t in types.items()
                                        if k != config["head_node_type"])


def test_onprem_hosts_match_the_elastic_worker_range():
    config = launcher_config(ROOT / "clusters" / "onprem.yaml")
    assert config["provider"]["type"] == "local" and len(config["provider"]["worker_ips"]) == 2
    (node_type,) = config["available_node_types"].values()
    lo, hi = gpu_range()
    # Owned hosts: the min stays in the cluster (the run can always start), the max is the whole range.
    assert (node_type["min_workers"] * GPUS_PER_NODE, node_type["max_workers"] * GPUS_PER_NODE) == (lo, hi)


# ------------------------------------------------------------------------------------------ KubeRay
def manifests(name: str) -> list[dict]:
    return list(yaml.safe_load_all((KUBERAY / name).read_text()))


def kuberay_autoscaling_config(spec: dict, name: str) -> dict:
    """What KubeRay's in-tree autoscaler derives from the cluster spec (it calls validate_config)."""
    return _derive_autoscaling_config_from_ray_cr({"metadata": {"name": name, "namespace": "default"}, "spec": spec})


def test_raycluster_autoscales_gpu_groups():
    pvc, cluster = manifests("raycluster.yaml")
    assert (pvc["kind"], pvc["spec"]["accessModes"]) == ("PersistentVolumeClaim", ["ReadWriteMany"])
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["rayVersion"].startswith("2.60")
    types = kuberay_autoscaling_config(spec, cluster["metadata"]["name"])["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    lo, hi = gpu_range()
    gpu_groups = {k: v for k, v in types.items() if v["resources"].get("GPU")}
    assert set(gpu_groups) == {"gpu-a100x8", "gpu-h100x8"}
    for group in gpu_groups.values():
        assert group["resources"]["GPU"] == GPUS_PER_NODE
        assert group["min_workers"] == 0 and group["max_workers"] * GPUS_PER_NODE == hi
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        mounts = {m["mountPath"] for m in group["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert "/mnt/shared" in mounts


def entrypoint_job(entrypoint: str) -> tuple[Path, PretrainJob]:
    """The script and the validated job of `python jobs/X.py --config NAME --set k=v ...`."""
    argv = shlex.split(entrypoint)
    assert argv[0] == "python"
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    config = argv[argv.index("--config") + 1]
    return ROOT / argv[1], load_job(config, PretrainJob, sets)  # a shipped config's name


def test_rayjob_runs_pretraining_on_shared_storage():
    (job,) = manifests("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    cluster = manifests("raycluster.yaml")[1]
    assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"working_dir": "/home/ray/mtnlg_ray"}
    script, pretrain = entrypoint_job(spec["entrypoint"])
    assert script == ROOT / "jobs" / "pretrain.py" and script.is_file()
    assert pretrain.scaling.storage_path.startswith("/mnt/shared/") and pretrain.scaling.shared_storage
    assert all(d.path.startswith("/mnt/shared/") for d in pretrain.data.datasets)


def test_rayservice_serve_config_validates_with_serve_and_our_model():
    (svc,) = manifests("rayservice.yaml")
    assert (svc["apiVersion"], svc["kind"]) == ("ray.io/v1", "RayService")
    cluster_spec = svc["spec"]["rayClusterConfig"]
    assert cluster_spec["enableInTreeAutoscaling"] is True
    types = kuberay_autoscaling_config(cluster_spec, svc["metadata"]["name"])["available_node_types"]

    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    assert app.import_path == "mtnlg_ray.serve.deploy:build_app"
    job = ServeJob.model_validate(app.args)
    # Serve's own typed-builder call: args -> ServeJob -> our build_app -> a Serve Application.
    application = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
    deployment = application._bound_deployment
    auto = deployment._deployment_config.autoscaling_config
    a = job.serve.autoscaling
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == \
           (a.min_replicas, a.max_replicas, a.target_ongoing_requests)
    assert deployment.ray_actor_options["num_gpus"] == job.serve.num_gpus == 1
    # One one-GPU pod per replica at most: the GPU group's range covers the replica range.
    gpu = types["gpu"]
    assert gpu["resources"]["GPU"] == 1
    assert (gpu["min_workers"], gpu["max_workers"]) == (a.min_replicas, a.max_replicas)
    assert job.serve.checkpoint.startswith("/mnt/shared/")


def test_image_installs_the_readme_way():
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-" in dockerfile
    assert dockerfile.index(f"pip install --no-cache-dir {makefile_torch()}") < dockerfile.index("pip install --no-cache-dir -e")
    ignored = (KUBERAY / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and "runs" in ignored
