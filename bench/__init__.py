"""Benchmarks and experiments: ``python bench/speed.py`` (speed and memory against the peers),
``python -m bench.quality`` (retrieval quality), ``python bench/cached_memory.py``. A package so that
the tests import them as ``bench.speed`` and ``bench.quality``."""
