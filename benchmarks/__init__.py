"""The project's benchmarks (run as scripts: ``python benchmarks/bench_overhead.py``, ``benchmarks/bench_data.py``)."""
