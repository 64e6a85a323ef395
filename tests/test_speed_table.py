"""The speed-vs-model-size figure and the published speed sweeps (bench.publish --speed)."""

from __future__ import annotations

import pandas as pd
import pytest

from bench.publish import SPEED_SWEEPS, commands
from bench.report.speed import batch_sizes, model_order, plot_speed_by_size


def rows(models: dict[str, float]) -> pd.DataFrame:
    out = []
    for model, gmacs in models.items():
        out.append({"model": model, "method": "none", "label": "none", "gmacs": gmacs, "latency_mode": "eager"})
        for mode, gain in (("eager", 1.0), ("compile", 1.2)):
            out.append(
                {
                    "model": model,
                    "method": "tome",
                    "label": "tome",
                    "gmacs": 0.65 * gmacs,
                    "latency_mode": mode,
                    "budget": 0.65,
                    "device": "CPU test (2 threads)",
                    "speedup_b1": 0.9 * gain,
                    "speedup_b32": 1.3 * gain,
                }
            )
    return pd.DataFrame(out)


def test_models_are_ordered_by_their_unreduced_size():
    df = rows({"deit_base_patch16_224 (random weights)": 17.6, "deit_tiny_patch16_224": 1.26, "deit_small": 4.6})
    assert model_order(df) == ["deit_tiny_patch16_224", "deit_small", "deit_base_patch16_224 (random weights)"]
    assert batch_sizes(df) == [1, 32]


def test_the_figure_needs_two_models(tmp_path):
    assert plot_speed_by_size(rows({"deit_tiny_patch16_224": 1.26}), tmp_path / "a.png") is None
    path = plot_speed_by_size(rows({"deit_tiny_patch16_224": 1.26, "deit_small_patch16_224": 4.6}), tmp_path / "b.png")
    assert path is not None and path.stat().st_size > 10_000
    df = rows({"deit_tiny_patch16_224": 1.26, "deit_small_patch16_224": 4.6})
    lone = df[(df["model"] == "deit_tiny_patch16_224") & (df["latency_mode"] == "compile")].assign(
        latency_mode="cpp-wrapper"
    )  # timed on DeiT-Tiny only: one marker, no line
    assert plot_speed_by_size(pd.concat([df, lone]), tmp_path / "c.png").stat().st_size > 10_000


@pytest.mark.parametrize("model", ["deit_tiny", "deit_small", "deit_base"])
def test_speed_sweeps_time_every_size_on_random_weights_without_accuracy(model):
    todo = commands("results/speed", [], SPEED_SWEEPS)
    sweeps = [cmd for _, cmd in todo if f"model={model}" in cmd]
    modes = [a.split("=")[1] for cmd in sweeps for a in cmd if a.startswith("bench.latency.compile=")]
    assert modes == (["eager", "compile", "cpp-wrapper"] if model == "deit_tiny" else ["eager", "compile"])
    for cmd in sweeps:
        for setting in ("model.random_init=true", "bench.accuracy=false", "bench.spectral.enabled=false"):
            assert setting in cmd
        assert "results_dir=results/speed" in cmd


def test_speed_sweeps_run_every_eager_size_before_compiling():
    """A table stopped part-way has every model size in at least one mode."""
    modes = [a for _, cmd in commands("results/speed", [], SPEED_SWEEPS) for a in cmd if "latency.compile=" in a]
    assert modes == ["bench.latency.compile=eager"] * 3 + ["bench.latency.compile=compile"] * 3 + [
        "bench.latency.compile=cpp-wrapper"
    ]


def test_a_device_and_batch_size_never_measured_gets_no_empty_axes(tmp_path, monkeypatch):
    """The CPU ran batches 1 and 32, the GPU only 256: three panels drawn, the other three say
    "not measured" instead of showing empty axes."""
    from bench.report import speed

    cpu = rows({"deit_tiny_patch16_224": 1.26, "deit_small_patch16_224": 4.6})
    gpu = cpu[cpu["method"] != "none"].assign(device="GPU test", speedup_b1=None, speedup_b32=None, speedup_b256=1.4)
    drawn = []
    real_panel = speed._panel
    monkeypatch.setattr(
        speed,
        "_panel",
        lambda ax, d, column, *a: drawn.append((d["device"].iloc[0], column)) or real_panel(ax, d, column, *a),
    )
    assert plot_speed_by_size(pd.concat([cpu, gpu], ignore_index=True), tmp_path / "c.png") is not None
    assert sorted(drawn) == [
        ("CPU test (2 threads)", "speedup_b1"),
        ("CPU test (2 threads)", "speedup_b32"),
        ("GPU test", "speedup_b256"),
    ]


def test_the_legend_names_each_method_once_and_each_timing_mode_once(tmp_path, monkeypatch):
    """Methods by colour, timing modes by line style: 2 methods × 3 modes make 2 + 1 + 3
    entries, not 6 method-and-mode pairs; panels exist only where something was measured."""
    from bench.report import speed

    df = rows({"deit_tiny_patch16_224": 1.26, "deit_small_patch16_224": 4.6})
    evit = df[df["method"] == "tome"].assign(method="evit", label="evit")
    cpp = evit[evit["latency_mode"] == "compile"].assign(latency_mode="cpp-wrapper")
    seen = {}

    def capture(fig, path, title, legend=None, **_):
        seen["texts"] = [text for _, text in legend]
        seen["handles"] = {text: handle for handle, text in legend}
        seen["panels"] = [ax.get_title() for ax in fig.axes if ax.axison]
        return path

    monkeypatch.setattr(speed, "save", capture)
    plot_speed_by_size(pd.concat([df, evit, cpp], ignore_index=True), tmp_path / "d.png")
    assert seen["texts"] == [
        "evit",
        "tome",
        "line style: timing",
        "eager",
        "compiled (inductor)",
        "compiled (C++ wrapper), hollow",
    ]
    assert seen["panels"] == ["CPU test (2 threads), fp32, batch 1", "CPU test (2 threads), fp32, batch 32"]
    # a timing mode's sample is its line alone (a marker hid a dash-dot's pattern), but the
    # C++ wrapper's hollow marker, which is what tells it apart
    modes = ["eager", "compiled (inductor)", "compiled (C++ wrapper), hollow"]
    assert [seen["handles"][m].get_marker() for m in modes] == ["None", "None", "o"]
    assert seen["handles"]["compiled (C++ wrapper), hollow"].get_markerfacecolor() == "none"


def _grid_rows() -> pd.DataFrame:
    """Two methods on two models, eager and compiled on a CPU, one GPU setting; the compiled
    DeiT-Small row of ``slow`` was timed on a busy host."""
    out = []
    for model, gmacs in (("deit_small_patch16_224 (random weights)", 4.6), ("deit_tiny_patch16_224", 1.26)):
        out.append({"model": model, "method": "none", "label": "none", "gmacs": gmacs, "budget": None})
        for method, gain in (("slow", 0.9), ("fast", 1.3)):
            for mode, device, batch in (("eager", "CPU x (2 threads)", 1), ("compile", "CPU x (2 threads)", 1)):
                out.append(
                    {
                        "model": model,
                        "method": method,
                        "label": method,
                        "gmacs": 0.65 * gmacs,
                        "budget": 0.65,
                        "device": device,
                        "latency_mode": mode,
                        f"speedup_b{batch}": gain + (0.1 if mode == "compile" else 0.0),
                        "latency_busy_reason": "busy" if (method, mode, gmacs) == ("slow", "compile", 4.6) else None,
                    }
                )
        out.append(
            {
                "model": model,
                "method": "fast",
                "label": "fast",
                "budget": 0.65,
                "device": "NVIDIA H9",
                "latency_mode": "eager",
                "latency_precision": "bf16",
                "speedup_b256": 2.0,
            }
        )
    return pd.DataFrame(out)


def test_the_speed_grid_groups_settings_and_puts_the_models_side_by_side():
    from bench.report.speed import speed_grid

    values, busy, order, budget = speed_grid(_grid_rows())
    assert budget == 0.65
    tiny, small = "deit_tiny_patch16_224", "deit_small_patch16_224 (random weights)"
    assert order == [
        ("CPU x (2 threads)", "fp32", 1, "eager", tiny),
        ("CPU x (2 threads)", "fp32", 1, "eager", small),
        ("CPU x (2 threads)", "fp32", 1, "compile", tiny),
        ("CPU x (2 threads)", "fp32", 1, "compile", small),
        ("NVIDIA H9", "bf16", 256, "eager", tiny),
        ("NVIDIA H9", "bf16", 256, "eager", small),
    ]
    assert list(values.index) == ["fast", "slow"]  # by median speedup
    assert values.loc["slow"].tolist()[:4] == pytest.approx([0.9, 0.9, 1.0, 1.0])
    assert values.loc["slow"].isna().tolist()[4:] == [True, True]  # never timed there: no cell
    assert busy.loc["slow"].tolist() == [False, False, False, True, False, False]
    assert not busy.loc["fast"].any()


def test_the_speed_grid_needs_two_settings_at_one_budget(tmp_path, monkeypatch):
    from bench.report import speed

    df = _grid_rows()
    one = df[(df["model"] == "deit_tiny_patch16_224") & (df["latency_mode"] != "compile")]
    one = one[one["device"] != "NVIDIA H9"]
    assert speed.speed_grid(one) is None and speed.plot_speed_grid(one, tmp_path / "a.png") is None
    assert speed.speed_grid(pd.concat([df, df.assign(budget=0.5)])) is None
    seen = {}
    monkeypatch.setattr(speed, "save", lambda fig, path, title, **_: seen.update(title=title, ax=fig.axes[0]) or path)
    speed.plot_speed_grid(df, tmp_path / "b.png")
    cells = [t.get_text() for t in seen["ax"].texts]
    assert "1.00*" in cells and "2.00" in cells and len(cells) == 10
    assert "*: timed on a busy host" in seen["title"] and "measured on CPU x (2 threads); NVIDIA H9" in seen["title"]
    assert seen["ax"].get_xticklabels()[0].get_text() == "deit_tiny\nCPU fp32\nbatch 1\neager"


def test_a_label_timed_twice_in_one_setting_shows_its_latest_timing():
    from bench.report.speed import speed_grid

    df = _grid_rows().assign(timestamp="2026-01-01")
    again = df[df["method"] == "fast"].assign(timestamp="2026-02-01", speedup_b1=1.7, dataset="other")
    values = speed_grid(pd.concat([again, df], ignore_index=True)).values
    assert values.loc["fast"].tolist()[:4] == pytest.approx([1.7, 1.7, 1.7, 1.7])
