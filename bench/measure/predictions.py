"""What an accuracy pass predicted: its own module, so that :mod:`bench.measure.subject` (which
holds the unreduced model's predictions) and :mod:`bench.measure.accuracy` (which makes them)
both import it and neither imports the other, not even for types."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from bench.measure.shared_prefix import BlockInputs


@dataclass
class Predictions:
    top5: Tensor
    """(N, 5) class indices, best first."""
    block_inputs: BlockInputs | None = None
    """Tokens this pass fed one block (``keep_block``), for reduced models that start there."""
    shared: str = "not shared"
    """How a reduced model's pass used the unreduced pass's tokens (see :mod:`bench.measure.shared_prefix`)."""

    @property
    def top1(self) -> Tensor:
        return self.top5[:, 0]
