"""longreach.launchers — the ``longreach`` command line and the job launchers."""
if __name__ != "longreach.launchers":  # pragma: no cover
    raise ImportError(f"longreach's launchers folder was imported as {__name__!r}; import it as 'longreach.launchers'")
