"""Float32 regions inside a model that may run under autocast.

Distances and the DCT operator cancel large terms, so they are computed in float32 even when
``bench.latency.amp`` runs the model under bf16 autocast. ``torch.autocast`` refuses a device
type it has no autocast for (the ``meta`` device, where a forward computes shapes alone, say
to count a large model's FLOPs without its weights; other backends), so the region is entered
only where autocast exists and is on: elsewhere nothing can lower the precision and there is
nothing to turn off.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def without_autocast(device: torch.device) -> AbstractContextManager[object]:
    """A context in which nothing runs in autocast's lower precision on ``device``."""
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return nullcontext()
