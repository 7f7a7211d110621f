"""Functions that spawned test and benchmark ranks run (importable, never defined in test files)."""
