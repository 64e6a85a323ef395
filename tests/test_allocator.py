"""The allocator switch: freed activations are reused instead of faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import resource, statistics, timm, torch
from bench.allocator import keep_freed_memory
state = keep_freed_memory()
torch.manual_seed(0)
model = timm.models.vision_transformer.VisionTransformer(embed_dim=192, depth=2, num_heads=3).eval()
x = torch.randn(64, 3, 224, 224)  # attention and MLP activations above glibc's 32 MiB mmap threshold
faults = []
with torch.inference_mode():
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(state, statistics.median(faults[1:]))
"""


def _probe(**env: str) -> tuple[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    *state, faults = out.stdout.split()
    return " ".join(state), float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_repeated_vit_forwards_reuse_their_memory_instead_of_faulting_it_in():
    """Median page faults of the five forwards after the first: glibc's default faults every
    large activation in afresh (~30 000-50 000 pages a forward here); the kept heap reuses it
    (0 in most forwards). The median, because on a busy machine one forward now and then lands
    a block in a new place and faults it in (CI once saw 18 912 pages in one of three)."""
    state, kept = _probe()
    default_state, default = _probe(FATR_MALLOC="default")
    assert state == "glibc heap kept" and default_state == "default (FATR_MALLOC=default)"
    assert default > 20_000, "the behaviour the switch removes did not show, so this test could not fail"
    assert kept * 5 < default
