"""A fine-tuned model on disk: its weights, its reducer's state, and where they came from.

``bench.run`` evaluates one like any other weights (``model.checkpoint=.../final.pt``). The file
names its base model, which stays the unreduced reference of the evaluation (so Δ top-1 and
agreement compare the fine-tuned model with the model it started from), and the method and
budget it was trained for, which the evaluation must use.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from bench.config import BudgetConfig, Config, ModelConfig
from bench.errors import BenchError

FORMAT = "fatr-bench-finetuned/1"
REDUCER_PREFIX = "token_reducer."


@dataclass(frozen=True)
class Finetuned:
    """A loaded fine-tuned checkpoint.

    Args:
        path: the file.
        weights: the model's weights (the reducer's state apart).
        reducer: the reducer's ``state_dict`` (ω, DC positional terms, ...), to load after
            ``apply_reducer`` has bound the reducer to the model.
        meta: ``model``, ``method`` and ``budget`` configs, ``identity`` (what determined the
            weights: recipe, training images, seed) and ``provenance`` (for the run store).
    """

    path: str
    weights: dict[str, Tensor]
    reducer: dict[str, Tensor]
    meta: dict[str, Any]

    @property
    def identity(self) -> dict[str, Any]:
        return self.meta["identity"]

    @property
    def provenance(self) -> dict[str, Any]:
        return {**self.meta["provenance"], "checkpoint": self.path}

    def load_into(self, model: nn.Module) -> None:
        """Load weights and reducer state into ``model`` (patched with the same method)."""
        state = {**self.weights, **{REDUCER_PREFIX + k: v for k, v in self.reducer.items()}}
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        bad = [k for k in own if k in state and own[k].shape != state[k].shape]
        if missing or unexpected or bad:
            what = (missing and f"missing {missing[0]}") or (unexpected and f"unexpected {unexpected[0]}")
            what = what or f"{bad[0]} has shape {tuple(state[bad[0]].shape)}, expected {tuple(own[bad[0]].shape)}"
            raise BenchError(f"fine-tuned checkpoint {self.path} does not fit this model and method ({what})")
        model.load_state_dict(state, strict=True)


def swap_in(tuned: Finetuned, cfg: Config, model: nn.Module, data, device) -> None:
    """Load the fine-tuned state into ``model``, which still holds the base weights: first the
    relative analyses cache their unreduced reference from those, so that, like accuracy's Δ
    and agreement, they compare the fine-tuned model with the model it started from."""
    from bench.measure.spectral import spectral_job
    from bench.measure.subject import Measured, subject_of
    from methods.identity import NoReduction

    spectral = cfg.bench.spectral
    if spectral.enabled:  # computes and keeps the reference; the numbers are not needed
        spectral_job(spectral, subject_of(cfg, model, NoReduction(), data, device), Measured())
    tuned.load_into(model)


def save_finetuned(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model`` (patched) and ``meta`` atomically."""
    from bench.train.trainer import save_atomic

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    weights = {k: v for k, v in state.items() if not k.startswith(REDUCER_PREFIX)}
    reducer = {k[len(REDUCER_PREFIX) :]: v for k, v in state.items() if k.startswith(REDUCER_PREFIX)}
    return save_atomic({"format": FORMAT, "model": weights, "reducer": reducer, "meta": meta}, Path(path))


def save_reducer_state(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Only the reducer's state (plus ``meta``): all that changes with ``train=reducer``, and
    the file FATR's ``omega_path`` loads."""
    from bench.train.trainer import save_atomic

    state = {k: v.detach().cpu() for k, v in model.token_reducer.state_dict().items()}
    return save_atomic({**state, "meta": meta}, Path(path))


def read_finetuned(path: str | Path) -> Finetuned | None:
    """The checkpoint at ``path`` if ``bench.finetune`` wrote it, else None (plain weights)."""
    import torch

    path = Path(path).expanduser()
    if path.suffix == ".safetensors" or not path.is_file():
        return None
    try:
        saved = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not ours; the plain loader reports what is wrong with it
        return None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        return None
    return Finetuned(str(path), saved["model"], saved["reducer"], saved["meta"])


def resolve_finetuned(cfg: Config) -> tuple[Config, Finetuned | None]:
    """For ``model.checkpoint`` = a fine-tuned checkpoint: the config of its base model (the
    unreduced reference) and the checkpoint; any other config comes back unchanged."""
    ckpt = cfg.model.checkpoint
    tuned = read_finetuned(ckpt) if ckpt else None
    if tuned is None:
        return cfg, None
    meta = tuned.meta
    if cfg.model.name != meta["model"]["name"]:
        raise BenchError(f"{ckpt} is a fine-tuned {meta['model']['name']}, not {cfg.model.name}: set model.name")
    given = asdict(cfg.method)
    if given != meta["method"]:
        from bench.train.trainer import differences

        raise BenchError(
            f"{ckpt} was fine-tuned with method {meta['method'].get('name')} "
            f"(this run's method differs in: {', '.join(differences(meta['method'], given)[:4])}); "
            "evaluate it with the method it was trained with"
        )
    budget = asdict(cfg.budget)
    if meta["method"].get("name") != "none" and budget != meta["budget"]:
        raise BenchError(
            f"{ckpt} was fine-tuned at budget.macs_ratio={meta['budget']['macs_ratio']} "
            f"(tolerance {meta['budget']['tolerance']}); evaluate it at the same budget"
        )
    base = meta["model"]
    if base.get("checkpoint") and not Path(base["checkpoint"]).expanduser().is_file():
        raise BenchError(
            f"{ckpt} was fine-tuned from {base['checkpoint']}, which is not found here: "
            "the unreduced reference is measured from it"
        )
    model = ModelConfig(**{**base, "img_size": cfg.model.img_size})
    return replace(cfg, model=model, budget=BudgetConfig(**meta["budget"])), tuned
