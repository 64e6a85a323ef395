"""The speed targets' tables (``bench/report/targets.py``): which rows each target reads, what
it needs of each method (the paper's ratio where the paper has one), and that a target without
rows says so instead of vanishing."""

from __future__ import annotations

import pandas as pd
import pytest

from bench.report.summary import summary_markdown, summary_sections
from bench.report.targets import TARGETS, has_target_rows, paper_ratios, target_lines, targets_section

CPU = "CPU AMD EPYC (2 threads)"


def _row(method, model="deit_tiny_patch16_224", device=CPU, mode="eager", precision="fp32", budget=0.65, **cols):
    return {
        "method": method,
        "model": f"{model} (random weights)",
        "device": device,
        "latency_mode": mode,
        "latency_precision": precision,
        "budget": budget,
        **cols,
    }


def _target(title_start: str):
    (t,) = [t for t in TARGETS if t.title.startswith(title_start)]
    return t


def test_the_papers_ratios_are_its_throughputs_over_the_unreduced_models():
    small = paper_ratios("deit_small")
    assert small["evit"] == pytest.approx(3742 / 2803) and small["fatr"] == pytest.approx(3659 / 2803)
    assert set(small) == {"evit", "tome", "diffrate", "fatr"}
    assert paper_ratios("deit_base")["evit"] == pytest.approx(1338 / 918)
    assert paper_ratios("deit_tiny") == {}


def test_batch_1_eager_needs_more_than_1_and_reads_only_its_own_rows():
    df = pd.DataFrame(
        [
            _row("none", budget=None, speedup_b1=None),
            _row("fatr", speedup_b1=1.10),
            _row("tome", speedup_b1=1.00),  # equal is not faster
            _row("dct", speedup_b1=1.0004),  # 1.000 would read as not faster
            _row("evit", speedup_b1=0.50, mode="compile"),  # another mode: not this target's
            _row("pool", speedup_b1=0.50, budget=0.5),  # another budget
            _row("topk", speedup_b1=0.50, device="CPU AMD EPYC (1 thread)"),  # another thread count
            _row("random", speedup_b1=0.50, model="deit_small_patch16_224"),  # another model
        ]
    )
    lines = target_lines(df, _target("CPU, batch 1, eager"))
    table = [line for line in lines if line.startswith("| ") and "method" not in line]
    assert table == [
        "| fatr | > 1.000 | 1.100 | yes |",
        "| tome | > 1.000 | 1.000 | **no** |",
        "| dct | > 1.000 | 1.0004 | yes |",
    ]
    assert (
        "2 of 3 methods meet it (4 more not measured at these settings: evit, pool, random, topk). "
        "Measured on CPU AMD EPYC (2 threads)"
    ) in "\n".join(lines)


def test_the_unreduced_forward_each_mode_divided_by_is_given_as_a_range():
    """The footer says how fast the unreduced model ran in the target's jobs, per mode: a busy
    host's rows show as a slower reference."""
    df = pd.DataFrame(
        [
            _row("fatr", speedup_b1=1.1, latency_ms_baseline_b1=16.71),
            _row("tome", speedup_b1=1.0, latency_ms_baseline_b1=21.25),
            _row("fatr", speedup_b1=1.3, mode="compile", latency_ms_baseline_b1=17.2),
            _row("pool", speedup_b1=1.3, budget=0.5, latency_ms_baseline_b1=99.0),  # another budget: not read
        ]
    )
    text = "\n".join(target_lines(df, _target("CPU, batch 1, compiled")))
    assert "the unreduced forward, timed in each job: 17.2 ms compile;" in text
    text = "\n".join(target_lines(df, _target("CPU, batch 1, eager")))
    assert "the unreduced forward, timed in each job: 16.7–21.2 ms eager;" in text


def test_deit_s_needs_the_papers_ratio_or_1_25_and_either_mode_may_meet_it():
    gpu = "NVIDIA H200"
    df = pd.DataFrame(
        [
            _row("evit", "deit_small_patch16_224", gpu, speedup_b256=1.30),  # paper: 1.335
            _row("evit", "deit_small_patch16_224", gpu, mode="cudagraphs", speedup_b256=1.40),
            _row("pool", "deit_small_patch16_224", gpu, speedup_b256=1.26),
            _row("fatr", "deit_small_patch16_224", gpu, precision="bf16", speedup_b256=2.0),  # bf16: not fp32's
        ]
    )
    lines = target_lines(df, _target("GPU, DeiT-S fp32"))
    assert "| method | needed | eager | cudagraphs | met |" in lines
    assert "| evit | ≥ 1.335 | 1.300 | 1.400 | yes |" in lines
    assert "| pool | ≥ 1.250 | 1.260 | – | yes |" in lines
    assert not any(line.startswith("| fatr") for line in lines)
    base = target_lines(df.assign(model="deit_base_patch16_224 (random weights)"), _target("GPU, DeiT-B fp32"))
    assert not any(line.startswith("| pool") for line in base)  # no target at DeiT-B without a paper ratio
    # pool has no target at DeiT-B, so it is not "not measured" there either; fatr's rows are bf16
    assert "0 of 1 methods meet it (1 more not measured at these settings: fatr). Measured" in "\n".join(base)
    assert "(1 more not measured at these settings: fatr)" in "\n".join(lines)  # its rows are bf16


def test_cpu_compiled_reads_inductors_python_and_cpp_wrappers_each_in_its_column():
    df = pd.DataFrame(
        [
            _row("pitome", mode="compile", speedup_b1=1.19),
            _row("pitome", mode="cpp-wrapper", speedup_b1=1.23),
            _row("tome", mode="compile", speedup_b1=1.25),
            _row("mctf", mode="cpp-wrapper", speedup_b1=1.15),
            _row("evit", mode="max-autotune", speedup_b1=2.0),  # not a mode of this target
        ]
    )
    lines = target_lines(df, _target("CPU, batch 1, compiled"))
    assert "| method | needed | compile | cpp-wrapper | met |" in lines
    assert "| pitome | ≥ 1.200 | 1.190 | 1.230 | yes |" in lines
    assert "| tome | ≥ 1.200 | 1.250 | – | yes |" in lines
    assert "| mctf | ≥ 1.200 | – | 1.150 | **no** |" in lines
    assert not any(line.startswith("| evit") for line in lines)


def test_the_torch_that_measured_is_named_where_records_carry_it():
    """The lent GPU's torch is not CI's (2.11 there, 2.14 here): a compiled row is that
    torch's compiler's. Records from before the field have none, and are not named."""
    gpu = "NVIDIA H200"
    rows = [
        _row("evit", device=gpu, mode="cudagraphs", precision="bf16", speedup_b256=1.2, torch="2.11.0+cu130"),
        _row("tome", device=gpu, mode="cudagraphs", precision="bf16", speedup_b256=0.9, torch=None),
    ]
    text = "\n".join(target_lines(pd.DataFrame(rows), _target("GPU, DeiT-Tiny bf16")))
    assert (
        "Measured on NVIDIA H200; deit_tiny_patch16_224 (random weights); torch 2.11.0+cu130 (where recorded);" in text
    )
    text = "\n".join(target_lines(pd.DataFrame(rows[1:]), _target("GPU, DeiT-Tiny bf16")))
    assert "torch" not in text


def test_rows_of_two_gpus_get_a_table_each_and_never_stand_in_for_each_other():
    """An H100 lease after H200 ones: a method's H100 ratio is not its H200 one, so each device
    is its own table (a method met on one and missed on the other shows both)."""
    rows = [
        _row("tome", device="NVIDIA H200", mode="cudagraphs", precision="bf16", speedup_b256=0.9),
        _row("evit", device="NVIDIA H200", mode="cudagraphs", precision="bf16", speedup_b256=1.2),
        _row("tome", device="NVIDIA H100 80GB HBM3", mode="cudagraphs", precision="bf16", speedup_b256=1.1),
        _row("pool", device="NVIDIA H100 80GB HBM3", mode="eager", precision="bf16", speedup_b256=0.5),
    ]
    lines = target_lines(pd.DataFrame(rows), _target("GPU, DeiT-Tiny bf16"))
    text = "\n".join(lines)
    h100, h200 = text.split("**GPU, DeiT-Tiny bf16, batch 256, CUDA graphs: no reducer slower than unreduced (on ")[1:]
    assert h100.startswith("NVIDIA H100 80GB HBM3)**") and h200.startswith("NVIDIA H200)**")
    assert "| tome | ≥ 1.000 | 1.100 | yes |" in h100 and "evit" not in h100.split("meet it")[0]
    assert "1 of 1 methods meet it (2 more not measured at these settings: evit, pool). Measured on NVIDIA H100" in h100
    assert "| tome | ≥ 1.000 | 0.900 | **no** |" in h200 and "| evit | ≥ 1.000 | 1.200 | yes |" in h200
    assert "1 of 2 methods meet it (1 more not measured at these settings: pool). Measured on NVIDIA H200;" in h200
    one = target_lines(pd.DataFrame(rows[:2]), _target("GPU, DeiT-Tiny bf16"))
    assert one[0] == "**GPU, DeiT-Tiny bf16, batch 256, CUDA graphs: no reducer slower than unreduced**"


def test_a_target_without_rows_says_so_and_a_folder_without_any_gets_no_section():
    df = pd.DataFrame([_row("fatr", speedup_b1=1.1)])
    text = "\n".join(targets_section(df))
    assert text.count("Not measured in this folder.") == len(TARGETS) - 1
    assert "speed_targets" in summary_sections(df, None)
    assert "## Speed targets" in summary_markdown(summary_sections(df, None))
    other = pd.DataFrame([_row("fatr", speedup_b1=1.1, budget=0.5)])
    assert not has_target_rows(other) and "speed_targets" not in summary_sections(other, None)
    assert "## Speed targets" not in summary_markdown(summary_sections(other, None))
