"""Loading timm ViTs with real weights: a local checkpoint, or the hub (see bench/sources.py for
which one a job uses); random weights only where asked for.

Weights are loaded once per process and every job gets its own copy, because patching a model
for a reducer mutates it.
"""

from __future__ import annotations

import copy
import difflib
import logging
import pickle
import zipfile
from pathlib import Path

import timm
import torch
from torch import nn

from bench.errors import BenchError
from bench.finite import check_finite_weights
from bench.sources import cached_hub_file
from methods import apply_reducer, remove_reducer
from methods.identity import NoReduction

_CACHE: dict[tuple, nn.Module] = {}


def create_model(name: str, img_size: int | None = None, **kw) -> nn.Module:
    """``timm.create_model`` with a clear error for unknown names."""
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise BenchError(f"unknown model {name!r} (not a timm model name).{hint}")
    if img_size is not None:
        kw["img_size"] = img_size
    return timm.create_model(name, **kw)


def check_checkpoint_file(path: str | Path) -> Path:
    """``path`` as a checkpoint file that exists and is not empty (read by :func:`read_state_dict`;
    a sweep checks it once before its first job)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BenchError(f"checkpoint not found: {path} (set model.checkpoint=PATH or FATR_CHECKPOINT)")
    if path.stat().st_size == 0:
        raise BenchError(f"cannot read checkpoint {path}: the file is empty (0 bytes)")
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = check_checkpoint_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - SafetensorError and OS errors mean the same to the user
            raise BenchError(
                f"cannot read checkpoint {path}: not a complete safetensors file ({_first_line(e)})"
            ) from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        reason = (
            "it holds Python objects besides tensors (only plain weights are loaded: weights_only=True)"
            if zipfile.is_zipfile(path)
            else "not a torch checkpoint (corrupt, or not a weights file)"
        )
        raise BenchError(f"cannot read checkpoint {path}: {reason}") from None
    except Exception as e:  # noqa: BLE001 - truncated zips raise RuntimeError, OSError or EOFError
        raise BenchError(f"cannot read checkpoint {path}: truncated or corrupt torch file ({_first_line(e)})") from None
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BenchError(f"{path} does not hold a state dict")
    odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise BenchError(f"{path} is not a plain state dict: {odd[0]!r} is not a tensor")
    return state


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0][:160] if lines else "") or type(e).__name__


def load_checkpoint(model: nn.Module, path: str | Path, name: str = "model") -> None:
    """Strict load that names the keys that do not match instead of a wall of text."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        raise BenchError(f"checkpoint {path} does not match {name}: " + "; ".join(parts))
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        k = bad[0]
        raise BenchError(
            f"checkpoint {path} does not match {name}: {k} has shape {tuple(state[k].shape)}, "
            f"model expects {tuple(own[k].shape)}" + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else "")
        )
    check_finite_weights(state.items(), f"checkpoint {path}")
    model.load_state_dict(state, strict=True)


def load_model(
    name: str,
    checkpoint: str | None = None,
    pretrained: bool = False,
    img_size: int | None = None,
    random_init: bool = False,
) -> nn.Module:
    """A fresh eval-mode copy of the model with real weights.

    ``checkpoint`` wins over ``pretrained`` (timm hub). ``random_init`` times an architecture
    whose weights are not at hand (FLOPs, latency, scaling); its accuracy means nothing, so it
    has to be asked for explicitly, and ``bench.sources`` refuses it for anything else.
    """
    key = (name, checkpoint, pretrained, img_size, random_init)
    if key not in _CACHE:
        kw = {"dynamic_img_size": True} if img_size is not None else {}
        if checkpoint:
            model = create_model(name, img_size=img_size, **kw)
            load_checkpoint(model, checkpoint, name)
        elif pretrained:
            create_model(name)  # unknown-name check before any download attempt
            cached = cached_hub_file(name)  # a local copy loads without touching the network
            if cached:
                kw["pretrained_cfg_overlay"] = {"file": cached}
            try:
                model = timm.create_model(name, pretrained=True, **({"img_size": img_size} if img_size else {}), **kw)
            except Exception as e:  # noqa: BLE001 - any hub failure means the same thing to the user
                raise BenchError(
                    f"could not fetch pretrained weights for {name} from the hub ({type(e).__name__}); "
                    "set model.checkpoint=PATH (or FATR_CHECKPOINT) to a local safetensors/torch file"
                ) from None
            check_finite_weights(model.state_dict().items(), f"the hub weights of {name}")
        elif random_init:
            model = create_model(name, img_size=img_size, **kw)
        else:
            raise BenchError(
                f"no weights for {name}: set model.checkpoint=PATH (or FATR_CHECKPOINT) or model.pretrained=true"
            )
        _CACHE[key] = model.eval()
    return copy.deepcopy(_CACHE[key]).eval()


def set_resolution(model: nn.Module, size: int) -> nn.Module:
    """Run the ViT at ``size`` x ``size`` (position embeddings interpolated by timm)."""
    patch = model.patch_embed.patch_size
    if size % patch[0] or size % patch[1]:
        raise BenchError(f"image size {size} is not divisible by the patch size {patch[0]}")
    if tuple(model.patch_embed.img_size) != (size, size):
        # timm logs every interpolation at INFO, which Hydra prints into the progress bars
        pos_logger = logging.getLogger("timm.layers.pos_embed")
        level = pos_logger.level
        pos_logger.setLevel(logging.WARNING)
        try:
            model.set_input_size(img_size=(size, size))
        finally:
            pos_logger.setLevel(level)
    return model


def model_without_reducer(model: nn.Module) -> nn.Module:
    """An unreduced copy that runs through the same patched code (``none`` reducer)."""
    ref = copy.deepcopy(model)
    remove_reducer(ref)
    apply_reducer(ref, NoReduction())
    return ref
