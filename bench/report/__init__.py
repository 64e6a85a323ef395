"""The leaderboard's sections, statistics and figures, read from the run store's records.

:mod:`bench.leaderboard` puts them together; each module here owns one section (significance
of differences, variants, spectral, scaling, the paper's frequency analysis, fine-tuned runs)
or a convention every figure shares (``style``, ``labels``).
"""
