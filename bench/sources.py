"""Where a job's weights and images come from, decided once before anything is loaded.

A fresh clone has no ``../shared`` folder, so the defaults cannot be paths. Weights come from,
in order: an explicit ``model.checkpoint``; the timm hub when ``model.pretrained=true``; random
weights when ``model.random_init=true``; ``FATR_CHECKPOINT``; ``<shared>/weights/<name>.safetensors``
when that file exists; else the timm hub. Random weights time an architecture whose weights are
not here (FLOPs, latency, scaling); what depends on learned weights is refused on them. Images: an
explicit ``data.root``; ``FATR_DATA_ROOT``; ``<shared>/data/imagenet-val-1300`` when present; else
Imagenette's validation split (10 ImageNet classes), downloaded once into a cache folder.

The resolved choice is written back into the job's config before its identity is hashed, so a
record says which weights and images it measured, and a run from the same files keeps the same
identity whichever way they were named. What needs the network is checked up front with a
few-second probe, so an offline machine gets one line listing the ways to give weights and
images instead of a minute of retries.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from omegaconf import DictConfig, open_dict

from bench.config import BenchConfig, Config, DataConfig, ModelConfig
from bench.errors import BenchError
from bench.terminal import say

SHARED_VAL = Path("data") / "imagenet-val-1300"
IMAGENETTE_URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz"
IMAGENETTE_DIR = "imagenette2-320"
PROBE_SECONDS = 3.0
WAYS_WEIGHTS = "model.checkpoint=PATH or FATR_CHECKPOINT=PATH"
WAYS_IMAGES = "data.root=PATH or FATR_DATA_ROOT=PATH (folders <wnid>/<file>.JPEG)"

_ANNOUNCED: set[str] = set()


@dataclass(frozen=True)
class Weights:
    """The weights a job loads: a file, the hub, or random."""

    checkpoint: str | None
    pretrained: bool
    random_init: bool
    origin: str
    """Why these: the setting or fallback that chose them (said in the run's first lines)."""

    def describe(self, name: str) -> str:
        if self.checkpoint:
            return f"weights: {self.checkpoint} ({self.origin})"
        if self.pretrained:
            return f"weights: the timm hub's pretrained {name} ({self.origin})"
        return f"weights: random ({self.origin}); FLOPs, latency and scaling only"


@dataclass(frozen=True)
class Images:
    """The evaluation images: a folder in the ImageNet val layout, and why it was chosen."""

    root: str | None
    origin: str
    needs_download: bool = False

    def describe(self) -> str:
        if self.origin == "imagenette":
            return (
                f"images: Imagenette val in {self.root}: a 10-class subset of ImageNet (labels through their "
                "wnids, scored over all 1000 classes), not comparable with ImageNet-val numbers; "
                "give your own with data.root=PATH or FATR_DATA_ROOT"
            )
        return f"images: {self.root} ({self.origin})"


def shared_dir() -> Path | None:
    """The folder of real weights and images laid beside the checkout, if there is one.

    Relative to the working directory first (the published records name ``../shared/...``),
    then beside the repository; ``FATR_SHARED`` overrides both."""
    env = os.environ.get("FATR_SHARED")
    if env:
        return Path(env)
    for candidate in (Path("..") / "shared", Path(__file__).resolve().parents[2] / "shared"):
        if candidate.is_dir():
            return candidate
    return None


def cache_dir() -> Path:
    """Where downloads are kept between runs: ``FATR_CACHE_DIR``, else the user's cache folder."""
    env = os.environ.get("FATR_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fatr-bench"


def reachable(url: str, timeout: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds
    (never, with ``FATR_OFFLINE=1``: a run that must not touch the network)."""
    if os.environ.get("FATR_OFFLINE") == "1":
        return False
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _offline() -> str:
    return " (FATR_OFFLINE=1)" if os.environ.get("FATR_OFFLINE") == "1" else ""


def resolve_weights(model: ModelConfig | DictConfig) -> Weights:
    """The weights of the ``model`` section (typed, or ``bench.finetune``'s DictConfig)."""
    name = model.name
    if model.checkpoint:
        return Weights(str(model.checkpoint), False, False, "model.checkpoint")
    if model.pretrained:
        return Weights(None, True, False, "model.pretrained=true")
    if getattr(model, "random_init", False):
        return Weights(None, False, True, "model.random_init=true")
    env = os.environ.get("FATR_CHECKPOINT")
    if env:
        return Weights(env, False, False, "FATR_CHECKPOINT")
    shared = shared_dir()
    if shared is not None and (shared / "weights" / f"{name}.safetensors").is_file():
        return Weights(str(shared / "weights" / f"{name}.safetensors"), False, False, "the shared weights folder")
    return Weights(None, True, False, "no local weights given: the timm hub")


REAL_WEIGHTS = f"give real weights ({WAYS_WEIGHTS} or model.pretrained=true)"
RANDOM_WEIGHTS = "model.random_init=true gives random weights"


def check_random_weights(model: ModelConfig | DictConfig, bench: BenchConfig | DictConfig) -> None:
    """Refuse random weights for the measurements whose numbers come from what a model learned.

    Random weights time an architecture (FLOPs, latency, scaling: how many tokens, not which),
    but their accuracy, agreement and spectral numbers are noise that a table would show beside
    real ones; so a job asking for those is refused before anything is loaded."""
    if not resolve_weights(model).random_init:
        return
    asked = [
        (["accuracy", "agreement"], "bench.accuracy=false", bool(bench.accuracy)),
        (["spectral"], "bench.spectral.enabled=false", bool(bench.spectral.enabled)),
    ]
    what = [name for names, _, on in asked if on for name in names]
    if what:
        switches = " ".join(switch for _, switch, on in asked if on)
        raise BenchError(
            f"{RANDOM_WEIGHTS}: {_and(what)} numbers would mean nothing (random weights are for FLOPs, latency "
            f"and scaling only); set {switches}, or {REAL_WEIGHTS}"
        )


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def check_trainable_weights(model: ModelConfig | DictConfig) -> None:
    """Refuse fine-tuning from random weights: the teacher would be noise, and so would the
    accuracy the fine-tuned model is evaluated by."""
    if resolve_weights(model).random_init:
        raise BenchError(f"{RANDOM_WEIGHTS}: fine-tuning toward a random teacher would mean nothing; {REAL_WEIGHTS}")


def resolve_images(data: DataConfig | DictConfig) -> Images:
    """The evaluation images of the ``data`` section (typed, or ``bench.finetune``'s DictConfig)."""
    if data.root:
        return Images(str(data.root), "data.root")
    env = os.environ.get("FATR_DATA_ROOT")
    if env:
        return Images(env, "FATR_DATA_ROOT")
    shared = shared_dir()
    if shared is not None and (shared / SHARED_VAL).is_dir():
        return Images(str(shared / SHARED_VAL), "the shared ImageNet val folder")
    folder = imagenette_root()
    return Images(str(folder), "imagenette", needs_download=not folder.is_dir())


def imagenette_root() -> Path:
    return cache_dir() / IMAGENETTE_DIR / "val"


def cached_hub_file(name: str) -> str | None:
    """The local copy of ``name``'s pretrained weights in the hub cache, if one was downloaded
    before: loading it directly needs no network (no retries, no warnings offline)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename) if filename else None
            if isinstance(found, str):
                return found
    if cfg.url:
        import torch.hub

        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if path.is_file():
            return str(path)
    return None


def hub_problem(name: str) -> str | None:
    """Why timm cannot give ``name``'s pretrained weights here (None when it can): timm has none
    for it, or they are not cached and the hub does not answer within a few seconds."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        return f"timm has no pretrained weights for {name}"
    if cached_hub_file(name):
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return f"the timm hub's weights for {name} are not cached and HF_HUB_OFFLINE is set"
        url = constants.ENDPOINT
    else:
        url = cfg.url
    if not reachable(url):
        host = urlparse(url).hostname
        return f"the timm hub ({host}) cannot be reached{_offline()} and has no cached weights for {name}"
    return None


Cfg = TypeVar("Cfg", Config, DictConfig)


def resolve_sources(cfg: Cfg, announce: bool = True, images: bool = True) -> Cfg:
    """``cfg`` with ``model.checkpoint``/``model.pretrained`` and ``data.root`` filled in from the
    first source that has them; the run's first lines say which (once per process).

    ``cfg`` is a job's typed :class:`~bench.config.Config` or the DictConfig of a command that
    keeps one (``bench.finetune``, ``bench.visualize``); the same kind comes back. Raises one
    :class:`BenchError` naming every way to give what is missing when the only remaining source
    needs a network that does not answer. ``images=False``: only the weights (a command that
    evaluates nothing)."""
    weights = resolve_weights(cfg.model)
    images = resolve_images(cfg.data) if images else Images(cfg.data.root, "not needed")
    problems, ways = [], []
    hub = hub_problem(cfg.model.name) if weights.pretrained else None
    if hub:
        problems.append(f"no weights: {hub}")
        ways.append(f"weights with {WAYS_WEIGHTS}")
    if images.needs_download and not reachable(IMAGENETTE_URL):
        host = urlparse(IMAGENETTE_URL).hostname
        problems.append(f"no images: the Imagenette download ({host}) cannot be reached{_offline()}")
        ways.append(f"images with {WAYS_IMAGES}")
    if problems:
        raise BenchError("; ".join(problems) + f"; give {' and '.join(ways)}, or run where the network is reachable")
    if images.needs_download:
        download_imagenette(cache_dir())
    if announce:
        lines = [weights.describe(cfg.model.name)] + ([images.describe()] if images.origin != "not needed" else [])
        for line in lines:
            if line not in _ANNOUNCED:
                _ANNOUNCED.add(line)
                say(line)
    chosen = {"checkpoint": weights.checkpoint, "pretrained": weights.pretrained, "random_init": weights.random_init}
    if isinstance(cfg, Config):
        return replace(cfg, model=replace(cfg.model, **chosen), data=replace(cfg.data, root=images.root))
    out = cfg.copy()
    with open_dict(out):
        out.model.update(chosen)
        out.data.root = images.root
    return out


def download_imagenette(into: Path, fetch: Callable[[Path], None] | None = None) -> Path:
    """Download and unpack Imagenette (320 px) into ``into`` once; returns its val folder.

    It is unpacked into a temporary folder and moved into place whole, so an interrupted
    download leaves nothing that a later run would take for the dataset; the archive is
    deleted once unpacked. ``fetch(folder)`` must leave ``folder/imagenette2-320/val``
    (torchvision's downloader, with its progress bar, by default; tests pass a stub)."""
    final = into / IMAGENETTE_DIR
    if (final / "val").is_dir():
        return final / "val"
    into.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=into, prefix=".download-"))
    try:
        say(f"downloading Imagenette (10 ImageNet classes, val split used) into {into} (once)")
        try:
            (fetch or _torchvision_fetch)(work)
        except BenchError:
            raise
        except Exception as e:  # noqa: BLE001 - network, checksum and archive errors mean the same here
            raise BenchError(
                f"could not download Imagenette from {IMAGENETTE_URL} ({type(e).__name__}: {e}); "
                f"give images with {WAYS_IMAGES}; nothing partial was kept"
            ) from None
        if not (work / IMAGENETTE_DIR / "val").is_dir():
            raise BenchError(f"the Imagenette download in {work} has no {IMAGENETTE_DIR}/val folder")
        try:
            os.replace(work / IMAGENETTE_DIR, final)
        except OSError:  # another process finished first: theirs is as good as ours
            if not (final / "val").is_dir():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final / "val"


def _torchvision_fetch(folder: Path) -> None:
    from torchvision.datasets import Imagenette

    Imagenette(str(folder), split="val", size="320px", download=True)
    for archive in folder.glob("*.tgz"):
        archive.unlink()
