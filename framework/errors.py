"""User-facing errors: one clear message naming the file or setting, a non-zero exit, no traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, data path, command line). The CLI prints it as one line."""


class ConfigError(UserError, ValueError):
    """A config file, override or config value that does not fit the typed config: the one error every
    config class and the loader raise (the CLI exits with status 2). A ``ValueError`` too, so code that
    builds a config directly may catch either."""


class JobError(Exception):
    """The job failed for a reason outside the user's input (a dead or stalled rank). The CLI prints it
    as one line and exits with status 1."""
