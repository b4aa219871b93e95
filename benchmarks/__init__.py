"""Benchmarks of the esvit-kernels ops and models against the PyTorch peers (``python -m benchmarks``).

Modules: :mod:`~benchmarks.harness` (timing, memory, bandwidth, records), :mod:`~benchmarks.suite`
(providers, cases, the measuring loop), one module per suite (:mod:`~benchmarks.attention` with
:mod:`~benchmarks.attention_providers`, :mod:`~benchmarks.losses`, :mod:`~benchmarks.models`),
:mod:`~benchmarks.report` (JSON and tables) and :mod:`~benchmarks.plots` (PNG). ``test_bench_*.py`` are the
pytest-benchmark regression suite (``pytest benchmarks/ --benchmark-only``), outside ``make test``.
"""
