"""Benchmarks, reports and the cluster planner (longreach bench|report|plan)."""
