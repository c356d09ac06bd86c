"""Pieces of `benchmarks/serve.py`: workloads, streamed HTTP clients, server processes, statistics."""
