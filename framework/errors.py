"""User-facing errors: one clear message naming the file or setting, a non-zero exit, no traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, data path, command line). The CLI prints it as one line."""


class ConfigError(UserError):
    """A config file or override that does not fit the typed config."""
