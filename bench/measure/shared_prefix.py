"""A reduced model's blocks before its first reduction, taken from the unreduced model's pass.

Until a reducer first acts (EViT's and FATR's block 3 by default) the reduced model computes
exactly what the unreduced one computes, through the same patched code. So the unreduced
accuracy pass keeps the tokens entering that block (1300 DeiT-Tiny images at block 3: 197 MB),
and a reduced model that first acts at the same block starts its accuracy pass there: a batch of
100 took 0.64 s instead of 1.08 s for FATR at MACs 0.65 on the 2-core CPU (measured 2026-11-26),
with the same logits bit for bit.

Guarded, because an unequal start would silently change every prediction: the first batch runs
in full, and both the tokens it feeds that block and its logits must equal the kept tokens and
the shortened forward's logits exactly; otherwise (other weights, such as a fine-tuned model,
or a reducer that changes something before it first reduces) every batch runs in full.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from methods import first_reduction_block, forward_from_block

MAX_BYTES = 1 << 30
"""Tokens kept at most (bytes); a larger image set is evaluated in full."""


@dataclass
class BlockInputs:
    """The tokens entering ``blocks[block]`` for every image of ``images`` (in order)."""

    block: int
    tokens: Tensor
    """(N, T, C) on the CPU."""
    images: Tensor
    """The images they came from (the same tensor object, not a copy)."""


def start_block(model: nn.Module) -> int | None:
    """Where a shared prefix could start: the first reduction block, if it is not the first
    block (a reducer acting at block 0, like ToMe, shares nothing)."""
    block = first_reduction_block(model)
    return block if block else None


@contextmanager
def keeping_block_inputs(model: nn.Module, block: int | None, images: Tensor) -> Iterator[list[BlockInputs]]:
    """Keep the tokens entering ``blocks[block]`` during the forwards of ``images`` run inside
    (in order, as batches); yields a list that holds one :class:`BlockInputs` at the end, or
    none (no block, or more than :data:`MAX_BYTES` of tokens)."""
    found: list[BlockInputs] = []
    if block is None or not 0 < block < len(model.blocks):
        yield found
        return
    parts: list[Tensor] = []
    seen = [0]

    def keep(module: nn.Module, args: tuple) -> None:
        x = args[0]
        seen[0] += x.shape[0]
        if seen[0] * x[0].numel() * x.element_size() <= MAX_BYTES:
            parts.append(x.detach().to("cpu", copy=True))

    handle = model.blocks[block].register_forward_pre_hook(keep)
    try:
        yield found
    finally:
        handle.remove()
    kept = sum(p.shape[0] for p in parts)
    if kept == len(images) == seen[0]:
        found.append(BlockInputs(block, torch.cat(parts), images))


class SharedPrefix:
    """Runs one model's accuracy batches, from :class:`BlockInputs` where that is exact (none
    given: plain forwards)."""

    def __init__(self, model: nn.Module, start: BlockInputs | None, images: Tensor) -> None:
        self.model = model
        self.start = None
        self.checked = False
        self.outcome = "not shared"
        if start is None:
            return
        first = start_block(model)
        if first is None:
            self.outcome = "not shared (the reducer acts from block 0)"
        elif first != start.block:
            self.outcome = f"not shared (tokens kept at block {start.block}, this reducer first acts at {first})"
        elif start.images is images and start.tokens.shape[0] == len(images):
            self.start = start
            self.outcome = f"blocks 0-{first - 1} from the unreduced pass"
        else:
            self.outcome = "not shared (the tokens were kept for other images)"

    def __call__(self, batch: Tensor, first: int) -> Tensor:
        """Logits of images ``first..first+len(batch)-1``."""
        if self.start is None:
            return self.model(batch)
        tokens = self.start.tokens[first : first + len(batch)].to(batch.device)
        if not self.checked:
            self.checked = True
            return self._checked(batch, tokens)
        return forward_from_block(self.model, tokens, self.start.block)

    def _checked(self, batch: Tensor, tokens: Tensor) -> Tensor:
        entering: list[Tensor] = []
        handle = self.model.blocks[self.start.block].register_forward_pre_hook(
            lambda module, args: entering.append(args[0])
        )
        try:
            full = self.model(batch)
        finally:
            handle.remove()
        same = len(entering) == 1 and torch.equal(entering[0], tokens)
        if same:
            same = torch.equal(forward_from_block(self.model, tokens, self.start.block), full)
        if not same:
            self.outcome = (
                f"full forwards (the tokens entering block {self.start.block} or the logits of the first batch "
                "differed from the unreduced pass's)"
            )
            self.start = None
        return full
