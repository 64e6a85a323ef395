"""The leaderboard's latency columns: one group per batch size, and rows of one compile mode.

A record times every batch size of ``bench.latency.batch_size`` on its own (``latency_ms_b1``,
``speedup_b32``, ...); records from before batch-size lists hold one batch under the plain keys
and ``latency_batch``, and are read as that batch's group, so both render in one table. A
speedup compares two models run the same way, so rows timed eagerly and rows timed compiled
(``latency_compile``) are never one row, one table or one plot: the compile mode is part of
a row's key and of its group (:data:`bench.report.significance.GROUP_KEYS`), and so is the
precision (fp32, or bf16 autocast with ``bench.latency.amp``).
"""

from __future__ import annotations

import math
import re
from typing import Any

import pandas as pd

from bench.measure.compiling import COMPILE_TEXT
from bench.measure.latency import PER_BATCH_KEYS

EAGER = "eager"
CPP_WRAPPER = "cpp-wrapper"
FP32, BF16 = "fp32", "bf16"

PER_BATCH = {
    "latency_ms": "ms/batch",
    "img_per_s": "img/s",
    "speedup": "speedup",
    "speedup_iqr": "speedup IQR",
    "speedup_efficiency": "speedup eff.",
}
"""The columns shown once per batch size, in this order (``<key>_b<n>``)."""
PER_BATCH_RAW = ("speedup_q1", "speedup_q3", "latency_ms_baseline")
"""Per-batch columns the CSV keeps but the tables do not show (the unreduced model's own
ms/batch, timed beside the row's: how loaded the host was when the row's ratio was measured)."""
COMPILE_COLUMNS = {"compile_seconds": "compile s", "latency_compile_agreement": "compiled agree %"}
"""Shown in the tables of compiled rows only: each model's own compile time and top-1 agreement."""

LATENCY_METRICS = frozenset(
    {
        *PER_BATCH,
        *PER_BATCH_RAW,
        *PER_BATCH_KEYS,
        "latency_batch",
        "latency_batches",
        "latency_compile",
        "latency_compile_images",
        "latency_compile_note",
        "latency_compile_note_unreduced",
        "latency_compile_agreement",
        "latency_compile_agreement_unreduced",
        "compile_seconds",
        "compile_seconds_unreduced",
        "latency_measured_with",
        "load_avg",
        "amp_bf16",
        "threads",
    }
)
"""Every metric one latency measurement writes (plain names; per-batch ones add ``_b<n>``)."""

_SUFFIX = re.compile(r"^(?P<base>.+)_b(?P<n>\d+)$")


def split_batch(column: str) -> tuple[str, int | None]:
    """``speedup_b32`` -> ``("speedup", 32)``; a column without a batch suffix -> ``(column, None)``."""
    m = _SUFFIX.match(column)
    return (m["base"], int(m["n"])) if m else (column, None)


def is_latency_metric(key: str) -> bool:
    """Whether ``key`` is written by the latency measurement (so a newer one replaces it whole)."""
    base, n = split_batch(key)
    return key in LATENCY_METRICS or (n is not None and base in LATENCY_METRICS)


def latency_mode(record: dict[str, Any]) -> str:
    """How the record's latency was timed; eager where it timed none, or predates compile modes."""
    return (record.get("metrics") or {}).get("latency_compile") or EAGER


def latency_precision(record: dict[str, Any]) -> str:
    """``bf16`` where the latency ran under bf16 autocast (``bench.latency.amp``), else ``fp32``.
    Like the compile mode, part of a row's key and group: bf16 and fp32 speedups never mix."""
    metrics = record.get("metrics") or {}
    if "amp_bf16" in metrics:
        return BF16 if metrics["amp_bf16"] else FP32
    latency = ((record.get("config") or {}).get("bench") or {}).get("latency") or {}
    return BF16 if latency.get("amp") else FP32


def mode_heading(mode: Any, precision: Any = FP32) -> str:
    """What a group's heading adds for its compile mode and precision: nothing for eager fp32
    (old headings stay)."""
    text = ""
    if isinstance(mode, str) and mode != EAGER:
        text += f", latency {COMPILE_TEXT.get(mode, mode)}"
    if precision == BF16:
        text += ", bf16 autocast"
    return text


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def batch_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The per-batch table columns of one record: ``<key>_b<n>`` for every batch it timed,
    read from the plain keys and ``latency_batch`` in records of a single batch size."""
    sizes = metrics.get("latency_batches")
    if not sizes:
        batch = metrics.get("latency_batch")
        if not _num(batch):
            return {}
        sizes = [int(batch)]
        metrics = {**metrics, **{f"{k}_b{sizes[0]}": metrics.get(k) for k in (*PER_BATCH, *PER_BATCH_RAW)}}
    out = {}
    for n in sizes:
        out.update({f"{k}_b{n}": metrics.get(f"{k}_b{n}") for k in (*PER_BATCH, *PER_BATCH_RAW)})
        q1, q3 = out[f"speedup_q1_b{n}"], out[f"speedup_q3_b{n}"]
        out[f"speedup_iqr_b{n}"] = f"{q1:.3f}–{q3:.3f}" if _num(q1) and _num(q3) else None
    return {k: v for k, v in out.items() if v is not None}


def baseline_span(rows: pd.DataFrame, batch: int) -> str | None:
    """``"20.3–28.0 ms"``: the range of the unreduced model's own forward at ``batch`` over the
    jobs of ``rows`` (each row's speedup is a ratio to its job's); None where none was kept.
    A host busier than usual shows here as a slower unreduced forward."""
    ms = rows.get(f"latency_ms_baseline_b{batch}")
    ms = ms.dropna() if ms is not None else None
    if ms is None or ms.empty:
        return None
    lo, hi = f"{float(ms.min()):.1f}", f"{float(ms.max()):.1f}"
    return f"{lo} ms" if lo == hi else f"{lo}–{hi} ms"


def batches_in(df: pd.DataFrame) -> list[int]:
    """The batch sizes some row of ``df`` has a latency for, ascending."""
    found = {split_batch(c)[1] for c in df.columns if split_batch(c)[0] == "latency_ms"} - {None}
    return sorted(n for n in found if df[f"latency_ms_b{n}"].notna().any())


def batch_columns(columns: list[str] | pd.Index) -> list[str]:
    """The per-batch columns among ``columns``, by batch size, then as in :data:`PER_BATCH`."""
    order = list(PER_BATCH) + list(PER_BATCH_RAW)
    found = []
    for c in columns:
        base, n = split_batch(c)
        if n is not None and base in order:
            found.append((n, order.index(base), c))
    return [c for _, _, c in sorted(found)]


def section_columns(part: pd.DataFrame, columns: list[str]) -> list[str]:
    """A table's columns: the plain latency columns (``columns`` as the leaderboard lists them)
    replaced by one group per batch size measured in ``part``, then, for compiled rows, each
    model's compile time and agreement with eager."""
    sizes = batches_in(part)
    if not sizes:
        return columns
    group = [f"{k}_b{n}" for n in sizes for k in PER_BATCH if f"{k}_b{n}" in part and part[f"{k}_b{n}"].notna().any()]
    at = next((i for i, c in enumerate(columns) if c in PER_BATCH), len(columns))
    out = [c for c in columns[:at] if c not in PER_BATCH] + group + [c for c in columns[at:] if c not in PER_BATCH]
    compiled = "latency_mode" in part and (part["latency_mode"].fillna(EAGER) != EAGER).any()
    return out + ([c for c in COMPILE_COLUMNS if c in part] if compiled else [])


def column_title(column: str, titles: dict[str, str]) -> str:
    """A column's heading: ``speedup (b=32)`` for a per-batch one."""
    base, n = split_batch(column)
    if n is not None and base in PER_BATCH:
        return f"{PER_BATCH[base]} (b={n})"
    names = {**titles, **COMPILE_COLUMNS, "latency_mode": "latency", "latency_precision": "precision"}
    return names.get(column, column)


def base_column(column: str) -> str:
    """The column a per-batch one is a copy of (for its number format)."""
    base, n = split_batch(column)
    return base if n is not None and base in PER_BATCH else column


def summary_columns(df: pd.DataFrame) -> list[str]:
    """The sweep summary's latency columns: the speedup at each batch size (the plain speedup
    where no row says its batch), and the compile mode and precision when the sweep timed more
    than one."""
    modes = [c for c in ("latency_mode", "latency_precision") if c in df and df[c].nunique() > 1]
    speedups = [f"speedup_b{n}" for n in batches_in(df) if f"speedup_b{n}" in df and df[f"speedup_b{n}"].notna().any()]
    return modes + (speedups or ["speedup"])


def settings_text(s: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The latency settings a row was measured with: batch size(s), iterations and stop rule,
    autocast, threads and compile mode (batch sizes as measured: ``auto`` depends on the device)."""
    sizes = metrics.get("latency_batches") or [metrics.get("latency_batch", s.get("batch_size"))]
    several = len(sizes) > 1
    batch = f"batches {', '.join(map(str, sizes))}, each timed on its own" if several else f"batch {sizes[0]}"
    text = f"{batch}, {s.get('iters')} iters after {s.get('warmup')} warm-up"
    if s.get("tolerance") is not None:
        text = (
            f"{batch}, at least {s.get('iters')} iters after {s.get('warmup')} warm-up, "
            f"until the speedup IQR is within {s['tolerance']:.0%} of the median (at most "
            f"{s.get('max_seconds')} s, {s.get('max_iters')} iters{' per batch size' if several else ''})"
        )
    text += ", bf16" if s.get("amp") else ""
    text += f", {s['threads']} threads" if s.get("threads") else ""
    mode = metrics.get("latency_compile") or EAGER
    return text + (f", {COMPILE_TEXT.get(mode, mode)}" if mode != EAGER else "")


def compile_lines(part: pd.DataFrame, row_name: Any) -> list[str]:
    """Under a table of compiled rows: what compiling cost is in the compile s column, and each
    row whose compiled top-1 differed from eager or that recompiled while timed (its note)."""
    if "latency_mode" not in part or not (part["latency_mode"].fillna(EAGER) != EAGER).any():
        return []
    lines = [
        "Compiled: both models of a row compiled the same way before timing; compile s is each model's "
        "compile time (every batch size run once compiled), never in the timed loop; compiled agree % is "
        "its top-1 agreement with eager on the largest latency batch's images."
    ]
    noted = [r for _, r in part.iterrows() if _text(r.get("latency_compile_note"))]
    notes = [(row_name(r), r["latency_compile_note"]) for r in noted]
    if notes:
        lines.append("**Compiled timings that may not be the eager model's:**")
        lines += [f"- {name}: {why}" for name, why in notes]
    return lines


def _text(v: Any) -> bool:
    return isinstance(v, str) and bool(v)
