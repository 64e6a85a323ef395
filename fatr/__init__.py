"""Frequency-aware token reduction (Lee et al., NeurIPS 2025, arXiv 2511.21477).

Keep the tokens that carry high-frequency content, aggregate the low-frequency ones into DC
tokens, and re-weight attention so the high-frequency part is not smoothed away.
"""

from fatr.reducer import FATR
from fatr.scores import SCORES, hf_scores

__all__ = ["FATR", "SCORES", "hf_scores"]
