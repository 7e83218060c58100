"""User-facing errors: one clear line, no traceback, a fixed exit code.

`UserError` covers bad input found while running (a missing file, a corrupted checkpoint,
a malformed corpus): the CLI prints its message and exits 1. `ConfigError` is a wrong
config key, type or value: exit 2, like a usage error.
"""


class UserError(Exception):
    """A mistake in the user's input, reported as one line (exit code 1)."""

    exit_code = 1


class ConfigError(UserError):
    """A config file or `--set` override that does not validate (exit code 2)."""

    exit_code = 2
