"""What fine-tuning shows: each run's loss curve, and the leaderboard's fine-tuned section.

The section compares every fine-tuned method with two references, both evaluated on the same
images: the unreduced model fine-tuned with the same recipe and data (fine-tuning alone moves
accuracy, so this is the control) and the same method at the same budget off the shelf.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import BenchError
from bench.measure.outcomes import load_outcomes
from bench.report.stats import Interval, bootstrap_for, discordance
from bench.results_io import append_markdown
from bench.store import config_hash


def plot_loss_curve(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Loss (and its parts) against images seen, the learning rate on a second axis."""
    from bench.report.style import figure, save

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax,) = figure(1, 8, 4.5)
    if rows:
        x = [r["images_seen"] for r in rows]
        window = max(1, len(rows) // 20)  # per-step losses of augmented batches are noisy
        loss = pd.Series([r["loss"] for r in rows])
        ax.plot(x, loss, color="grey", lw=0.6, alpha=0.6, label="loss per step")
        ax.plot(x, loss.rolling(window, min_periods=1).mean(), color="black", lw=1.8, label=f"loss, mean of {window}")
        for part, colour in (("ce", "tab:blue"), ("kd", "tab:orange")):
            if part in rows[0] and "ce" in rows[0] and "kd" in rows[0]:
                smooth = pd.Series([r[part] for r in rows]).rolling(window, min_periods=1).mean()
                ax.plot(x, smooth, color=colour, lw=1, label=part)
        lr = ax.twinx()
        lr.plot(x, [r["lr"] for r in rows], color="tab:green", lw=1, ls="--", label="lr")
        lr.set_ylabel("learning rate", color="tab:green")
        lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        handles = ax.get_legend_handles_labels()[0] + lr.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper right")
    ax.set_xlabel("images seen")
    ax.set_ylabel("training loss (per step)")
    ax.grid(alpha=0.3)
    return save(fig, path, title)


def _without(config: dict[str, Any], *keys: str) -> str:
    return config_hash({k: v for k, v in config.items() if k not in keys})


def _top1(record: dict[str, Any] | None) -> float | None:
    return None if record is None else record.get("metrics", {}).get("top1")


def _paired(
    a: dict[str, Any], b: dict[str, Any] | None, results_dir: Path | None, resample: str, n_boot: int, seed: int
) -> tuple[Interval | None, float | None]:
    """Δ top-1 of ``a`` minus ``b`` with its 95% interval paired over the same images, and the
    exact McNemar p; (None, None) where either record lacks per-image outcomes on the same images."""
    if b is None or b is a or results_dir is None:
        return None, None
    files = [(r.get("metrics") or {}).get("outcomes_file") for r in (a, b)]
    if not all(files):
        return None, None
    try:
        oa, ob = (load_outcomes(results_dir, f) for f in files)
    except BenchError:
        return None, None
    if not oa.same_images(ob):
        return None, None
    iv = bootstrap_for(oa.label, resample, n_boot, seed).paired(oa.correct, ob.correct).scaled(100)
    return iv, discordance(oa.correct, ob.correct).p_value


def finetuned_rows(
    records: list[dict[str, Any]],
    results_dir: Path | None = None,
    resample: str = "images",
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per fine-tuned record (``records`` already one per configuration); with
    ``results_dir`` (where the per-image outcomes are) the Δs get paired intervals."""
    from bench.report.labels import display_name

    tuned = [r for r in records if "finetune" in r and "top1" in r.get("metrics", {})]
    shelf = {_without(r["config"], "bench"): r for r in records if "finetune" not in r and "config" in r}

    def setting(r: dict[str, Any]) -> tuple:
        c = r["config"]
        return (r["finetune"].get("recipe_hash"), c["model"].get("name"), c["data"].get("root"), c.get("device"))

    control = {setting(r): r for r in tuned if r.get("method") == "none"}
    rows = []
    for r in tuned:
        m, ft = r["metrics"], r["finetune"]
        off = shelf.get(_without(r["config"], "bench", "finetuned"))
        ctrl = control.get(setting(r))
        top1, n = m["top1"], r.get("num_images") or m.get("num_images")
        d_control, p_control = _paired(r, ctrl, results_dir, resample, n_boot, seed)
        d_shelf, p_shelf = _paired(r, off, results_dir, resample, n_boot, seed)
        rows.append(
            {
                "model": r.get("model"),
                "dataset": Path(r.get("data_root", "")).name,
                "images": n,
                "recipe": f"{ft.get('recipe_name')}, loss {ft.get('loss')}, train {ft.get('trained')}, "
                f"{ft.get('images_seen')} images seen of {Path(ft.get('train_root', '')).name} "
                f"(recipe {ft.get('recipe_hash')})",
                "method": r.get("method"),
                "label": display_name(r),
                "budget": r.get("budget", {}).get("macs_ratio_target"),
                "top1": top1,
                "se": 100 * math.sqrt(top1 / 100 * (1 - top1 / 100) / n) if n else float("nan"),
                "delta_control": None if ctrl is None or ctrl is r else top1 - _top1(ctrl),
                "delta_off_the_shelf": None if _top1(off) is None else top1 - _top1(off),
                "d_control": d_control,
                "p_control": p_control,
                "d_shelf": d_shelf,
                "p_shelf": p_shelf,
                "agreement": m.get("agreement"),
                "images_seen": ft.get("images_seen"),
                "steps": ft.get("steps"),
                "train_img_per_s": ft.get("img_per_s"),
                "weights": ft.get("weights"),
                "train_device": ft.get("device"),
                "curve": ft.get("loss_curve"),
                "config_hash": r.get("config_hash"),
            }
        )
    df = pd.DataFrame(rows)
    if not df.empty:
        df["_budget"] = df["budget"].fillna(2.0)
        df = df.sort_values(
            ["model", "dataset", "recipe", "_budget", "top1"], ascending=[True, True, True, False, False]
        )
        df = df.drop(columns="_budget").reset_index(drop=True)
    return df


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec)


def _delta_cells(row: pd.Series, key: str, unpaired: str) -> list[str]:
    iv = row[f"d_{key}"]
    if iv is None or (isinstance(iv, float) and math.isnan(iv)):
        value = row[unpaired]
        return [_fmt(value, "+.2f") + ("" if value is None or pd.isna(value) else " (unpaired)"), "–"]
    mark = " (tie)" if iv.contains(0.0) else ""
    return [f"{iv.estimate:+.2f} [{iv.low:+.2f}, {iv.high:+.2f}]{mark}", f"{row[f'p_{key}']:.3g}"]


def finetuned_section(
    records: list[dict[str, Any]],
    results_dir: Path,
    source: Path | None = None,
    resample: str = "images",
    n_boot: int = 2000,
    seed: int = 0,
) -> list[Path]:
    """Append the fine-tuned table to ``results_dir/leaderboard.md`` and plot the loss curves;
    per-image outcomes are read from ``source`` (default ``results_dir``)."""
    df = finetuned_rows(records, source or results_dir, resample, n_boot, seed)
    if df.empty:
        return []
    unit = "whole classes" if resample == "classes" else "images"
    lines = [
        "",
        "## Fine-tuned",
        "",
        "Each method fine-tuned at its budget (`python -m bench.finetune`), evaluated like the runs above. "
        "Δ control: against the unreduced model fine-tuned with the same recipe and data (what fine-tuning "
        "alone does); Δ off-the-shelf: against the same method and budget without fine-tuning. Both Δs are "
        f"paired over the same images (bootstrap over {unit}, {n_boot} resamples, seed {seed}; exact McNemar p); "
        "an interval that includes 0 means the two cannot be told apart on these images. ± is the binomial "
        "standard error of top-1 alone.",
        "",
    ]
    curves = []
    for (model, dataset, images, recipe), part in df.groupby(["model", "dataset", "images", "recipe"], sort=False):
        devices = ", ".join(sorted(set(part["train_device"].dropna())))
        lines += [
            f"### {model} on {dataset} ({images} images): {recipe}",
            "",
            f"Trained on: {devices}.",
            "",
            "| method | MACs target | top-1 % | Δ control [95%] | p | Δ off-the-shelf [95%] | p | agree % | steps "
            "| train img/s | weights |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for _, row in part.iterrows():
            cells = [row["label"], _fmt(row["budget"], ".2f"), f"{row['top1']:.2f} ± {row['se']:.2f}"]
            cells += _delta_cells(row, "control", "delta_control")
            cells += _delta_cells(row, "shelf", "delta_off_the_shelf")
            cells += [_fmt(row["agreement"], ".2f"), _fmt(row["steps"], "d"), _fmt(row["train_img_per_s"], ".1f")]
            lines.append("| " + " | ".join(cells) + f" | {row['weights']} |")
            curve = row["curve"] or {}
            for x, y in zip(curve.get("images_seen", []), curve.get("loss", []), strict=False):
                curves.append({"run": f"{row['label']} [{recipe.split(',')[0]}]", "images seen": x, "loss": y})
        lines.append("")
    append_markdown(results_dir, lines)
    if not curves:
        return []
    from bench.report.style import figure, lines_by_method, save

    fig, (ax,) = figure(1, 8, 4.5)
    lines_by_method(ax, pd.DataFrame(curves), "images seen", "loss", hue="run")
    for line in ax.get_lines():
        line.set_marker("")
    ax.set_ylabel("training loss")
    return [save(fig, results_dir / "finetune_loss.png", "Fine-tuning loss curves", legend_ax=ax)]
