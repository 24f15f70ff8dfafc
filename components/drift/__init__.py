"""Drift: production-log windows vs the training reference (Evidently), and the plant quality report.

check.run_drift_check is the entry point (`defectops drift`, the drift flows); reference, current, detect,
quality and window are its parts; simulate makes production-log records for benchmarks and tests.
"""
