"""User-facing errors: one clear message naming the file or setting, a non-zero exit, no traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, data path, command line). The CLI prints it as one line."""


class ConfigError(UserError):
    """A config file or override that does not fit the typed config."""


class JobError(Exception):
    """The job failed for a reason outside the user's input (a dead or stalled rank). The CLI prints it
    as one line and exits with status 1."""
