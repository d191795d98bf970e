"""The overhead benchmark: :class:`~lightning_kd.DistillationModule` under a Lightning ``Trainer`` against a plain
PyTorch loop over :class:`~lightning_kd.core.Distillation` doing the same work.

- :mod:`benchmarks.overhead.harness`: what to measure (the rows, from the method registry), the worker processes,
  the alternating rounds, timing and memory;
- :mod:`benchmarks.overhead.report`: the tables (markdown).

``benchmarks/bench_overhead.py`` is the command line.
"""
