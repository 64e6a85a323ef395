"""What a job measures, one module per measurement (accuracy, FLOPs, latency, spectral,
scaling), the ``Subject`` they all read, and the cache of the unreduced model's numbers.

Nothing here knows about tables, plots or training: a measurement writes metrics into a
record, and :mod:`bench.report` reads them.
"""
