"""The harness: runs, measurements, run store, leaderboard, fine-tuning.

Importing it registers every method the harness knows: the baselines in ``methods`` and FATR,
which lives in its own package on top of ``methods`` (``methods`` itself never imports it).
"""

import fatr  # noqa: F401  registers FATR next to the baselines
import methods  # noqa: F401  registers the baselines
