"""How a method is named in tables, legends and records, from a record or a reducer.

One place for the names, so that a row of the leaderboard, a line of a plot and a ``compare``
argument call one configuration the same thing.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

from methods import TokenReducer


def value_text(v: Any) -> str:
    """A setting as a table shows it: ``0.7``, ``[9,0,7]``, ``True``."""
    if isinstance(v, bool) or not isinstance(v, (int, float, list, tuple)):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(value_text(x) for x in v) + "]"
    return f"{v:.4g}"


def variant_label(reducer: TokenReducer) -> str:
    """The hyper-parameters that differ from the class defaults (the budget knob aside), so
    that two configurations of one method stay apart in tables and plots."""
    params = inspect.signature(type(reducer).__init__).parameters
    parts = []
    for key, value in reducer.hparams.items():
        default = params[key].default if key in params else inspect.Parameter.empty
        if key == reducer.budget_knob or (default is not inspect.Parameter.empty and _same(value, default)):
            continue
        if key.endswith("_path") and isinstance(value, str):
            value = Path(value).name
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


RANDOM_WEIGHTS = "random weights"


def has_random_weights(record: dict[str, Any]) -> bool:
    """Whether the record was measured on random weights (``model.random_init=true`` resolved
    to them: a checkpoint given beside it wins, and the record holds the resolved choice)."""
    model = (record.get("config") or {}).get("model")
    return isinstance(model, dict) and bool(model.get("random_init")) and not model.get("checkpoint")


def model_label(record: dict[str, Any]) -> str:
    """The model as tables and groups name it: ``deit_base_patch16_224 (random weights)`` for a
    timing-only run, so that it is never read as, or ranked with, the trained model."""
    name = str(record.get("model") or "")
    return f"{name} ({RANDOM_WEIGHTS})" if has_random_weights(record) else name


def display_name(record: dict[str, Any]) -> str:
    """Method name plus its non-default settings, short enough for a legend."""
    variant = re.sub(r"omega_path=[^,]+", "ω calibrated", record.get("variant") or "")
    return record.get("method", "") + (f" ({variant})" if variant else "")


METHOD_CONF = Path(__file__).parents[1] / "conf" / "method"
"""The method config group: ``method=<name>`` is ``<name>.yaml`` here, whose ``reducer._target_`` is the class."""


def _reducer_target(record: dict[str, Any]) -> str | None:
    """The reducer class a record ran: its stored method config's ``_target_``, or for records
    that did not store one, that of the method's config file of the same name."""
    method = (record.get("config") or {}).get("method")
    if isinstance(method, dict) and isinstance(method.get("reducer"), dict):
        return method["reducer"].get("_target_")
    path = METHOD_CONF / f"{record.get('method')}.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.load(path).get("reducer", {}).get("_target_")


def _configured_knob(record: dict[str, Any]) -> str | None:
    """The budget knob of the record's reducer class (records written before the knob was stored)."""
    try:
        from hydra.utils import get_class

        target = _reducer_target(record)
        return getattr(get_class(target), "budget_knob", None) if isinstance(target, str) else None
    except Exception:  # noqa: BLE001 - a plug-in class that cannot be imported here simply has no knob to show
        return None


def knob_text(record: dict[str, Any]) -> str:
    """``r=8``, ``keep_rate=0.7`` or ``r=[9,0,7]``: the solved knob, or the method's own."""
    budget = record.get("budget") or {}
    knob, value = budget.get("knob"), budget.get("knob_value")
    if not knob and budget.get("macs_ratio_target") is None:
        knob = _configured_knob(record)
        value = (record.get("hparams") or {}).get(knob) if knob else None
    if not knob or value is None:
        return ""
    return f"{knob}={value_text(value)}"


def method_label(record: dict[str, Any]) -> str:
    """A method in the spectral and scaling sections: its name and budget (``tome @0.65``),
    or its knob where it ran at its own setting."""
    target = record.get("budget", {}).get("macs_ratio_target")
    name = display_name(record)
    return f"{name} {knob_text(record)}".strip() if target is None else f"{name} @{target:.2f}"
