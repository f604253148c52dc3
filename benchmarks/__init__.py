"""Benchmarks run with ``python -m benchmarks.<name>`` (``make bench-ingest``); not part of the test suite."""
