"""What a leaderboard row must say besides its numbers, so that no two rows are confused.

- its knob, also for runs at the method's own knob (``budget.macs_ratio=null``): ToMe r=8 and
  r=200 are different rows and must read differently;
- the bench settings its latency, spectral and scaling numbers were measured with, since a
  row merges the newest measurement of each kind from several runs of one configuration;
- what the reducer did differently from its configuration (its ``notes``, e.g. a capped r);
- that its model ran on random weights (timing only), when it did.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from bench.report.labels import RANDOM_WEIGHTS, value_text
from bench.report.latency import settings_text as latency_settings_text

# Measurement groups whose numbers depend on bench settings, and the metric that marks them measured.
GROUPS = {"latency": "latency_ms", "spectral": "spectral_blocks", "scaling": "scaling"}


def measured_settings(record: dict[str, Any]) -> dict[str, str]:
    """The bench settings behind each group of numbers the record measured (a row merged
    by the leaderboard carries them already)."""
    if isinstance(record.get("_settings"), dict):
        return dict(record["_settings"])
    bench = (record.get("config") or {}).get("bench") or {}
    metrics = record.get("metrics") or {}
    out = {}
    for group, marker in GROUPS.items():
        s = bench.get(group)
        if marker not in metrics or not isinstance(s, dict):
            continue
        if group == "latency":  # batch sizes as measured, and the compile mode
            text = latency_settings_text(s, metrics)
        elif group == "spectral":  # the images measured: fewer than bench.spectral.images on a smaller set
            text = f"{metrics.get('spectral_images', s.get('images'))} images, {s.get('bands')} bands"
        else:
            text = (
                f"resolutions {value_text(s.get('resolutions'))}, batch of {s.get('batch_tokens')} tokens, "
                f"{s.get('iters')} iters after {s.get('warmup')} warm-up"
            )
            if s.get("max_seconds_per_point") is not None:
                text += f", latency where one point costs at most {s['max_seconds_per_point']} s"
        out[group] = text
    return out


def settings_lines(part: pd.DataFrame) -> list[str]:
    """One line per measurement group: its settings, or which rows were measured differently;
    then the rows whose latency was measured on a busy machine."""
    lines = []
    for group in GROUPS:
        col = f"{group}_settings"
        if col not in part:
            continue
        rows = part.dropna(subset=[col])
        distinct = list(dict.fromkeys(rows[col]))
        if len(distinct) == 1:
            lines.append(f"{group.capitalize()} settings: {distinct[0]}.")
        elif len(distinct) > 1:
            lines.append(f"**{group.capitalize()} measured with different settings in these rows; compare with care:**")
            for text in distinct:
                names = ", ".join(row_name(r) for _, r in rows[rows[col] == text].iterrows())
                lines.append(f"- {text}: {names}")
    if "latency_busy_reason" in part:
        busy = [(row_name(r), r["latency_busy_reason"]) for _, r in part.iterrows()]
        busy = [(n, why) for n, why in busy if isinstance(why, str) and why]
        if busy:
            lines.append("**Latency measured on a busy machine (speedups less certain):**")
            lines += [f"- {name}: {why}" for name, why in busy]
    return lines


def row_name(row: pd.Series) -> str:
    """Label, knob and budget: enough to find the row in the table."""
    name = row["label"] + (f" {row['knob']}" if row.get("knob") else "")
    budget = row.get("budget")
    return name + (f" @{budget:.2f}" if isinstance(budget, float) and budget == budget else "")


def note_lines(part: pd.DataFrame) -> list[str]:
    """What the table's rows were measured on when that is random weights (its heading says so
    too), then the reducers' notes, pointed to by † in the knob column."""
    lines = weights_lines(part)
    if "notes" not in part:
        return lines
    return lines + [
        f"† {row_name(r)}: {r['notes']}" for _, r in part.iterrows() if isinstance(r.get("notes"), str) and r["notes"]
    ]


def weights_lines(part: pd.DataFrame) -> list[str]:
    """One line under a table of random-weights rows: what their numbers are, and are not."""
    models = part["model"].astype(str) if "model" in part else pd.Series(dtype=str)
    if not models.str.endswith(f"({RANDOM_WEIGHTS})").any():
        return []
    return [
        f"**All rows: {RANDOM_WEIGHTS}** (model.random_init=true): the FLOPs, latency and scaling of the "
        "architecture, not of a trained model; no accuracy or spectral numbers."
    ]
