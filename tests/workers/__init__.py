"""Rank workers of the multi-rank tests, started by ``longreach.testing.run_ranks`` from the test files.

Importable as ``workers.*`` (tests/conftest.py puts the test folder on ``sys.path``, which the spawned
ranks inherit). Nothing in the installed package imports from here.
"""
