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

from bench.results_io import append_markdown
from bench.store import config_hash


def plot_loss_curve(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Loss (and its parts) against images seen, the learning rate on a second axis."""
    from bench.plots import figure, save

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


def finetuned_rows(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per fine-tuned record (``records`` already one per configuration)."""
    from bench.labels import display_name

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


def finetuned_section(records: list[dict[str, Any]], results_dir: Path) -> list[Path]:
    """Append the fine-tuned table to ``leaderboard.md`` and plot the loss curves."""
    df = finetuned_rows(records)
    if df.empty:
        return []
    lines = [
        "",
        "## Fine-tuned",
        "",
        "Each method fine-tuned at its budget (`python -m bench.finetune`), evaluated like the runs above. "
        "Δ control: against the unreduced model fine-tuned with the same recipe and data (what fine-tuning "
        "alone does); Δ off-the-shelf: against the same method and budget without fine-tuning. ± is the "
        "binomial standard error of top-1; both Δs are unpaired differences, so one smaller than "
        "1.96·√2·SE (≈ 2.8 SE) is within noise.",
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
            "| method | MACs target | top-1 % | Δ control | Δ off-the-shelf | agree % | steps | train img/s "
            "| weights |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for _, row in part.iterrows():
            lines.append(
                f"| {row['label']} | {_fmt(row['budget'], '.2f')} | {row['top1']:.2f} ± {row['se']:.2f} | "
                f"{_fmt(row['delta_control'], '+.2f')} | {_fmt(row['delta_off_the_shelf'], '+.2f')} | "
                f"{_fmt(row['agreement'], '.2f')} | {_fmt(row['steps'], 'd')} | "
                f"{_fmt(row['train_img_per_s'], '.1f')} | {row['weights']} |"
            )
            curve = row["curve"] or {}
            for x, y in zip(curve.get("images_seen", []), curve.get("loss", []), strict=False):
                curves.append({"run": f"{row['label']} [{recipe.split(',')[0]}]", "images seen": x, "loss": y})
        lines.append("")
    append_markdown(results_dir, lines)
    if not curves:
        return []
    from bench.plots import figure, lines_by_method, save

    fig, (ax,) = figure(1, 8, 4.5)
    lines_by_method(ax, pd.DataFrame(curves), "images seen", "loss", hue="run")
    for line in ax.get_lines():
        line.set_marker("")
    ax.set_ylabel("training loss")
    return [save(fig, results_dir / "finetune_loss.png", "Fine-tuning loss curves", legend_ax=ax)]
