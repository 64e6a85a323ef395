"""The unreduced model's measurements, kept on disk and reused across the jobs of a sweep and across sweeps.

Every reduced job is compared with the same unreduced model on the same images, so its
predictions, its FLOPs, its spectral reference and its latency at each scaling resolution need
measuring only once. They are stored under ``<results_dir>/cache/<kind>-<hash>.pt``, keyed by everything
that can change their numbers:

- the model: its name and input size, and a hash of the weights themselves (a new checkpoint,
  a fine-tuned file, hub weights or a random initialisation each get their own entries);
- the images: the selected files (relative path, size, modification time) and a sample of the
  decoded tensors, so a changed folder, ``data.limit`` or transform is a miss;
- the device: its name, the torch thread count, and the torch and timm versions;
- the code that measures (``methods/``, ``fatr/`` and the measuring modules of ``bench/``);
- the settings of the measurement itself (batch size, images, resolutions, iterations, ...);
  for a timing, the latency settings it ran under (:func:`latency_key`: autocast, threads, and
  the job's ``bench.latency.compile`` mode).

An entry is written whole under a unique temporary name and renamed into place, so
concurrent writers (joblib or SLURM jobs sharing a results folder) never leave a half file:
the last rename wins, and every candidate is a complete measurement of the same thing. A
damaged entry is a miss (measured again, with one warning). Writing is best effort: an entry
that cannot be written (a full disk) costs one warning and a measurement next time, never
the job, and leaves no partial file behind. ``cache=false`` turns the disk
cache off; ``rm -r <results_dir>/cache`` empties it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from bench.config import ModelConfig
from bench.data import ImageSet
from bench.results_io import write_failure
from bench.store import device_name

CACHE_DIR = "cache"
CODE = ("methods", "fatr", "bench/measure", "bench/data.py", "bench/finite.py", "bench/models.py")
"""Source whose change can change a cached number: any edit there invalidates every entry."""


def _digest(blob: Any) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def weights_fingerprint(model: nn.Module) -> str:
    """Hash of every tensor of the state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def images_fingerprint(data: ImageSet) -> str:
    """The selected files (relative path, size, mtime) and a strided sample of the decoded
    tensors: a changed folder, image count or transform gives another fingerprint."""
    h = hashlib.blake2b(digest_size=16)
    for p in data.paths:
        st = os.stat(p)
        h.update(f"{os.path.relpath(p, data.root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(f"{tuple(data.images.shape)}|{data.images.dtype}".encode())
    h.update(data.images[:, :, ::7, ::7].contiguous().numpy().tobytes())
    h.update(data.labels.numpy().tobytes())
    return h.hexdigest()


def device_fingerprint(device: torch.device) -> dict[str, Any]:
    return {
        "device": str(device),
        "name": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
    }


_CODE_HASH: str | None = None


def code_fingerprint() -> str:
    """Hash of the measuring code's source files (computed once per process)."""
    global _CODE_HASH
    if _CODE_HASH is None:
        root = Path(__file__).resolve().parents[2]
        h = hashlib.blake2b(digest_size=16)
        for entry in CODE:
            path = root / entry
            files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
            if not files or not all(f.is_file() for f in files):
                raise FileNotFoundError(f"measuring code {path} is missing: the cache could not tell its changes")
            for f in files:
                h.update(f"{f.relative_to(root)}\n".encode() + f.read_bytes())
        _CODE_HASH = h.hexdigest()
    return _CODE_HASH


def latency_key(amp: bool, threads: int | None, compile_mode: str | None = "eager") -> dict[str, Any]:
    """The latency settings a cached timing was measured under, for its entry's key.

    The compile mode is part of it although cached timings (the scaling points) are of eager
    forwards: a job that compiled ran them in a process with inductor's thread pools and, on
    CUDA, CUDA-graph memory pools set up, so an entry is never shared between modes. Eager adds
    nothing, so that entries from before compile modes keep their keys."""
    key: dict[str, Any] = {"amp": bool(amp), "threads": threads}
    if compile_mode not in (None, "eager"):
        key["compile"] = compile_mode
    return key


@dataclass
class MeasurementCache:
    """Entries of one unreduced model on one image set and device, under ``results_dir``.

    Args:
        results_dir: the run store's folder; entries go to its ``cache/`` subfolder.
        identity: what the measurements depend on besides their own settings (model, images,
            device, code fingerprints); see :func:`unreduced_cache`.
        enabled: False reads and writes nothing (every lookup is a miss).
    """

    results_dir: Path
    identity: dict[str, Any]
    enabled: bool = True
    hits: list[str] = field(default_factory=list)
    """Kinds served from disk in this process (shown in records)."""

    def key(self, kind: str, settings: dict[str, Any]) -> dict[str, Any]:
        return {"kind": kind, "settings": settings, **self.identity}

    def path(self, kind: str, settings: dict[str, Any]) -> Path:
        return Path(self.results_dir) / CACHE_DIR / f"{kind}-{_digest(self.key(kind, settings))[:20]}.pt"

    def load(self, kind: str, settings: dict[str, Any]) -> Any | None:
        """The stored value, or None (missing, disabled, or damaged: then one warning)."""
        if not self.enabled:
            return None
        path = self.path(kind, settings)
        if not path.exists():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(entry, dict) or entry.get("key") != json.dumps(self.key(kind, settings), sort_keys=True):
                raise ValueError("key mismatch")
            return entry["value"]
        except Exception as e:  # noqa: BLE001 - any unreadable entry is simply measured again
            print(f"warning: cache entry {path} unreadable ({type(e).__name__}); measuring again", file=sys.stderr)
            return None

    def store(self, kind: str, settings: dict[str, Any], value: Any) -> Path | None:
        """Write atomically (unique temporary file, fsync, rename); None when disabled or when
        the entry could not be written (then one warning: the job has its value either way)."""
        if not self.enabled:
            return None
        path = self.path(kind, settings)
        buffer = io.BytesIO()  # serialised first: torch.save on a full disk says only "unexpected pos"
        torch.save({"key": json.dumps(self.key(kind, settings), sort_keys=True), "value": value}, buffer)
        tmp = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            print(f"warning: {write_failure('could not write cache entry', path, e, '; not cached')}", file=sys.stderr)
            return None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        return path

    def get_or_compute(
        self,
        kind: str,
        settings: dict[str, Any],
        compute: Callable[[], Any],
        reusable: Callable[[Any], bool] = lambda v: True,
    ) -> tuple[Any, bool]:
        """``(value, from_cache)``: the stored value when there is one that ``reusable``
        accepts, else ``compute()`` (stored, then returned)."""
        value = self.load(kind, settings)
        if value is not None and reusable(value):
            self.hits.append(kind)
            return value, True
        value = compute()
        self.store(kind, settings, value)
        return value, False


def unreduced_cache(
    results_dir: str | Path,
    model: nn.Module,
    model_cfg: ModelConfig,
    data: ImageSet,
    device: torch.device,
    enabled: bool = True,
) -> MeasurementCache:
    """The cache of ``model`` (unreduced) on ``data`` and ``device``; ``model_cfg`` is the job's
    model section (name, input size; the weights are hashed, not their file named)."""
    identity = {
        "model": {"name": model_cfg.name, "img_size": model_cfg.img_size},
        "weights": weights_fingerprint(model) if enabled else None,
        "images": images_fingerprint(data) if enabled else None,
        "device": device_fingerprint(device),
        "code": code_fingerprint() if enabled else None,
    }
    return MeasurementCache(Path(results_dir), identity, enabled)
