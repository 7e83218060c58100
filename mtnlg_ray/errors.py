"""User-facing errors: one clear line, no traceback, a fixed exit code.

`UserError` covers bad input found while running (a corrupted checkpoint, a malformed corpus):
the CLI prints its message and exits 1. `ConfigError` is a wrong config key, type or value, or a
config that does not fit the run it would resume: exit 2, like a usage error. `PathError` is an
input path that does not exist (a dataset, checkpoint or run directory); it is found before Ray
or a model starts, so it is a usage error too: exit 2.
"""


class UserError(Exception):
    """A mistake in the user's input, reported as one line (exit code 1)."""

    exit_code = 1


class ConfigError(UserError):
    """A config file or `--set` override that does not validate (exit code 2)."""

    exit_code = 2


class PathError(UserError):
    """An input path that is missing or not what the command needs (exit code 2)."""

    exit_code = 2
