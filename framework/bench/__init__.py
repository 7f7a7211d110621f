"""Benchmarks and reports (``longreach bench|report``); each benchmark's rank-side code sits beside it (``*_ranks.py``)."""
