"""The unreduced baseline, as a reducer, so it runs through exactly the same patched code."""

from __future__ import annotations

from methods.base import TokenReducer


class NoReduction(TokenReducer):
    """Keeps every token. Its logits equal the unpatched model's (tested on real weights).

    Args: none; it is the unreduced reference (``method=none``).
    """

    def __init__(self) -> None:
        super().__init__()
