"""User-facing errors. The CLI prints their message on one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (config, data, model path, flags): one line, no traceback."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite steps)."""


class ConfigError(ValueError):
    """A configuration value or combination is invalid. The message names the key.

    Re-exported by :mod:`repo_rl.config`; the CLI turns it into exit code 2."""
