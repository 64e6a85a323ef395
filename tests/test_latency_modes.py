"""Issue 23, items 2 and 3: latency timed compiled (``bench.latency.compile``) and at several
batch sizes (``bench.latency.batch_size`` a list, batch 1 first-class).

Compiling with inductor takes most of a minute on a 2-core CPU, so the compiled job here uses
dynamo's ``eager`` backend (the same capture, guards and recompiles, no code generation):
what is tested is the harness around the compiler, not inductor.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from bench_utils import FAST, compose, image_folder, run_cli
from conftest import build_reducer, method_names, tiny_distilled_vit, tiny_vit

from bench import job as job_module
from bench.config import LatencyConfig
from bench.errors import BenchError
from bench.leaderboard import latest_per_config, markdown, result_key, summary, table
from bench.measure import busy as busy_module
from bench.measure import compiling as compiling_module
from bench.measure import latency as latency_module
from bench.measure.cache import CACHE_DIR
from bench.measure.compiling import TimedPair, compile_pair
from bench.measure.flops import VitShape
from bench.measure.forward_context import inference
from bench.measure.latency import latency_batch_sizes, measure_batches, unreduced_latency
from bench.report.summary import timed_days
from bench.store import read_records
from bench.validate import memory_needs, read_config
from methods import apply_reducer


@pytest.fixture
def quiet_machine(monkeypatch):
    monkeypatch.setattr(latency_module, "load_average", lambda: 0.0)
    monkeypatch.setattr(busy_module, "BUSY_SPREAD", math.inf)


def _scripted(pairs):
    """A timer returning (reduced ms, unreduced ms) per iteration in the alternating call order,
    and a clock that advances one second per reading (as in test_speed.py)."""
    calls: list[float] = []
    for batch in pairs:
        for i, (red, ref) in enumerate(batch):
            calls += [red, ref] if i % 2 == 0 else [ref, red]
    it = iter(calls)
    ticks = iter(range(10_000))
    return (lambda fn: next(it)), (lambda: float(next(ticks)))


# -- 3. batch sizes -------------------------------------------------------------------------------


def test_batch_sizes_by_device_one_integer_or_a_list():
    assert latency_batch_sizes("auto", "cpu") == latency_batch_sizes(None, "cpu") == [1, 32]
    assert latency_batch_sizes("auto", "cuda") == [1, 256]
    assert latency_batch_sizes(32, "cuda") == [32]  # old configs and records
    assert latency_batch_sizes([32, 1, 32], "cpu") == [1, 32]
    assert compose([])["bench"]["latency"]["batch_size"] == "auto"


def test_each_batch_size_is_timed_and_stopped_on_its_own(vit, quiet_machine):
    """Batch 1 steady (stops at the minimum), batch 3 noisy first (goes on until it settles):
    one stop rule per batch, every number under its own key, the plain keys the largest's."""
    steady = [(10.0, 20.0)] * 50
    settles = [(10.0, 10.0), (10.0, 40.0), (10.0, 10.0), (10.0, 40.0), (10.0, 10.0)] + [(30.0, 45.0)] * 45
    timer, clock = _scripted([steady[:5], settles[:13]])
    x = torch.randn(3, 3, 32, 32)
    section = LatencyConfig(warmup=0, iters=5, tolerance=0.05, max_seconds=None, max_iters=100)
    m = measure_batches(TimedPair(vit, copy.deepcopy(vit)), x, [1, 3], section, False, timer, clock)
    assert m["latency_batches"] == [1, 3]
    assert (m["latency_iters_b1"], m["latency_iters_b3"]) == (5, 13)
    assert m["speedup_b1"] == 2.0 and m["speedup_b3"] == 1.5
    assert m["img_per_s_b1"] == pytest.approx(100.0) and m["img_per_s_b3"] == pytest.approx(100.0)
    assert m["latency_ms"] == m["latency_ms_b3"] == 30.0 and m["latency_batch"] == 3
    assert m["latency_seconds"] == m["latency_seconds_b1"] + m["latency_seconds_b3"]
    assert m["peak_mem_mb_b1"] < m["peak_mem_mb_b3"]  # each batch its own forward's peak
    assert "latency_recompiles" not in m  # eager: no compile counter
    base = unreduced_latency(m, "pool")
    assert base["latency_ms_b1"] == m["latency_ms_baseline_b1"] == 20.0
    assert base["img_per_s_b3"] == m["img_per_s_baseline_b3"] and base["latency_batches"] == [1, 3]


def test_the_memory_check_reads_the_largest_batch():
    shape = VitShape.of(tiny_vit())
    (need,) = [
        n
        for n in memory_needs(read_config(compose(["bench.latency.batch_size=[1,100000]"])), shape, 32, 6)
        if "lat" in n.setting
    ]
    assert need.setting == "bench.latency.batch_size=[1,100000] (batch 100000)"
    assert need.input_bytes == 100000 * 3 * 32 * 32 * 4
    cuda = [n for n in memory_needs(read_config(compose([])), shape, 32, 6, torch.device("cuda")) if "lat" in n.setting]
    assert cuda[0].setting == "bench.latency.batch_size=auto (batch 256)"


def _record(method, ts, latency, mode="eager", **metrics):
    """A stored record, as bench.job writes it, with the latency settings it ran under."""
    config = {
        "method": {"name": method},
        "model": {"name": "m"},
        "data": {"root": "/d/val"},
        "budget": {"macs_ratio": 0.5},
        "device": "cpu",
        "bench": {"latency": {"iters": 5, "warmup": 1, "tolerance": None, "compile": mode, **latency}},
    }
    return {
        "config_hash": f"{method}-{ts}-{mode}",
        "method": method,
        "hparams": {},
        "timestamp": ts,
        "model": "m",
        "data_root": "/d/val",
        "num_images": 6,
        "device": "CPU A",
        "budget": {"macs_ratio_target": 0.5},
        "config": config,
        "metrics": {"top1": 70.0, "gmacs": 1.0, "macs_ratio": 0.5, **metrics},
    }


def _timed(batches, ms=10.0, speedup=2.0, mode="eager"):
    m = {"latency_batches": batches, "latency_compile": mode}
    for n in batches:
        m |= {f"latency_ms_b{n}": ms * n, f"img_per_s_b{n}": 1e3 / ms, f"speedup_b{n}": speedup * n}
        m |= {f"speedup_q1_b{n}": speedup * n - 0.1, f"speedup_q3_b{n}": speedup * n + 0.1}
        m |= {f"speedup_efficiency_b{n}": speedup * n * 0.5}
    big = batches[-1]
    return m | {"latency_ms": ms * big, "speedup": speedup * big, "latency_batch": big}


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_each_batch_size_is_a_column_group_and_old_records_still_render():
    old = _record("old", "1", {"batch_size": 32}, latency_ms=300.0, img_per_s=106.7, speedup=1.40, latency_batch=32)
    new = _record("new", "2", {"batch_size": [1, 32]}, **_timed([1, 32]))
    md = markdown(table([old, new]))
    header = _cells(next(line for line in md.splitlines() if line.startswith("| method |")))
    for n in (1, 32):
        for title in ("ms/batch", "img/s", "speedup", "speedup IQR", "speedup eff."):
            assert f"{title} (b={n})" in header, (title, n)
    assert "ms/batch" not in header and "speedup" not in header  # only per batch
    rows = {_cells(line)[0]: _cells(line) for line in md.splitlines() if line.startswith(("| old", "| new"))}
    assert rows["old"][header.index("speedup (b=32)")] == "1.400"
    assert rows["old"][header.index("speedup (b=1)")] == "–"
    assert rows["new"][header.index("speedup (b=1)")] == "2.000"
    assert rows["new"][header.index("speedup IQR (b=32)")] == "63.900–64.100"
    assert "**Latency measured with different settings in these rows; compare with care:**" in md
    assert "- batches 1, 32, each timed on its own, 5 iters after 1 warm-up: new @0.50" in md
    head = summary([old, new]).splitlines()[0]
    assert "speedup (b=1)" in head and "speedup (b=32)" in head


def test_a_newer_latency_measurement_replaces_the_older_whole():
    """Two runs of one configuration at other batch sizes: the row holds the newest's batches
    only, never a mix (its other metrics still merge)."""
    first = _record("a", "1", {"batch_size": [1, 32]}, **_timed([1, 32]))
    second = _record("a", "2", {"batch_size": [64]}, **_timed([64]))
    del second["metrics"]["top1"]
    (row,) = latest_per_config([first, second])
    assert row["metrics"]["latency_batches"] == [64] and "latency_ms_b1" not in row["metrics"]
    assert row["metrics"]["top1"] == 70.0


def test_a_row_remembers_when_its_latency_was_timed():
    """An accuracy-only run after the timing run does not move the row's latency day; a newer
    timing does. The headline names the days (a contended host's ratios differ from a quiet one's)."""
    timed = _record("a", "2026-11-26T10:00:00", {"batch_size": [1]}, **_timed([1]))
    accuracy = _record("a", "2026-12-05T09:00:00", {"batch_size": [1]})
    (row,) = latest_per_config([timed, accuracy])
    assert row["_latency_timed"] == "2026-11-26T10:00:00" and row["timestamp"] == "2026-12-05T09:00:00"
    retimed = _record("a", "2026-12-06T08:00:00", {"batch_size": [1]}, **_timed([1]))
    (row,) = latest_per_config([timed, accuracy, retimed])
    assert row["_latency_timed"] == "2026-12-06T08:00:00"
    other = _record("b", "2026-12-01T00:00:00", {"batch_size": [1]}, **_timed([1]))
    df = table([timed, accuracy, other])
    assert timed_days(df) == ", timed 2026-11-26 to 2026-12-01"
    assert timed_days(df[df["method"] == "b"]) == ", timed 2026-12-01"
    assert timed_days(table([accuracy])) == ""


# -- 2. compile modes -----------------------------------------------------------------------------


def test_compiled_and_eager_rows_never_mix():
    eager = _record("a", "1", {"batch_size": [1, 32]}, **_timed([1, 32]))
    compiled_metrics = _timed([1, 32], ms=5.0, mode="compile") | {
        "compile_seconds": 41.5,
        "latency_compile_agreement": 99.0,
        "latency_compile_note": "the reduced model: compiled (compile) top-1 agrees with eager on 99.0% of 32 images",
    }
    compiled = _record("a", "2", {"batch_size": [1, 32]}, mode="compile", **compiled_metrics)
    assert result_key(eager) != result_key(compiled)
    assert result_key(eager) == result_key(_record("a", "0", {"batch_size": 32}))  # eager keys as before
    df = table([eager, compiled])
    assert sorted(df["latency_mode"]) == ["compile", "eager"]
    md = markdown(df)
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings == [
        "## m on val (6 images), CPU A",
        "## m on val (6 images), CPU A, latency torch.compile (inductor)",
    ]
    eager_part, compiled_part = md.split(headings[1])
    assert "compile s" not in eager_part and "| compile s | compiled agree % |" in compiled_part
    assert "| 41.50 | 99.00 |" in compiled_part
    assert (
        "Latency settings: batches 1, 32, each timed on its own, 5 iters after 1 warm-up, torch.compile (inductor)."
        in md
    )
    assert "- a @0.50: the reduced model: compiled (compile) top-1 agrees with eager on 99.0% of 32 images" in md
    assert "latency" in summary([eager, compiled]).splitlines()[0]  # two modes in one sweep: said per row


def test_bf16_and_fp32_rows_never_mix():
    """One configuration timed in fp32 and under bf16 autocast (a GPU session runs both): two
    rows in two tables, never the newer replacing the older, and two panels by model size."""
    fp32 = _record("a", "1", {"batch_size": [256]}, mode="cudagraphs", **_timed([256], mode="cudagraphs"))
    bf16 = _record("a", "2", {"batch_size": [256], "amp": True}, mode="cudagraphs", **_timed([256], mode="cudagraphs"))
    bf16["metrics"]["amp_bf16"] = True
    assert result_key(fp32) != result_key(bf16)
    eager_fp32 = _record("a", "0", {"batch_size": 32})
    assert result_key(eager_fp32) == result_key(_record("a", "3", {"batch_size": 32}))  # fp32 keys as before
    df = table([fp32, bf16])
    assert sorted(df["latency_precision"]) == ["bf16", "fp32"]
    headings = [line for line in markdown(df).splitlines() if line.startswith("## ")]
    cudagraphs = "latency torch.compile (inductor, reduce-overhead: CUDA graphs)"
    assert headings == [
        f"## m on val (6 images), CPU A, {cudagraphs}",
        f"## m on val (6 images), CPU A, {cudagraphs}, bf16 autocast",
    ]
    assert "precision" in summary([fp32, bf16]).splitlines()[0]


def test_speed_plots_split_precisions_and_survive_two_rows_of_one_label(tmp_path):
    """The speed-by-size panels get a row per precision; a group holding one label twice (the
    same images under two paths) plots the newest instead of failing."""
    from bench.report.plots import plot_latency
    from bench.report.speed import plot_speed_by_size

    records = []
    for k, (model, amp) in enumerate([("s", False), ("s", True), ("b", False), ("b", True)]):
        for method in ("none", "a"):
            r = _record(method, str(k), {"batch_size": [256], "amp": amp}, **_timed([256]))
            r["model"] = r["config"]["model"]["name"] = model
            r["metrics"]["amp_bf16"] = amp
            r["metrics"]["gmacs"] = 1.0 if model == "s" else 4.0
            records.append(r)
    moved = copy.deepcopy(records[1])
    moved["config"]["data"]["root"] = moved["data_root"] = "/elsewhere/val"
    moved["timestamp"] = "9"
    df = table([*records, moved])
    assert (df["label"] == "a").sum() == 5
    assert plot_latency(df, tmp_path / "latency.png").is_file()
    assert plot_speed_by_size(df, tmp_path / "speed.png").is_file()


def test_a_compiled_model_that_disagrees_with_eager_or_fails_is_said(vit, images, monkeypatch):
    """A compiler that changes the answer cannot pass its timings off as the eager model's; one
    that fails is one line."""
    monkeypatch.setattr(torch, "compile", lambda m, **kw: _Negated(m))
    pair = compile_pair(vit, copy.deepcopy(vit), images, [1, 3], "compile")
    assert pair.compiled and pair.metrics["latency_compile_images"] == 3
    assert pair.metrics["latency_compile_agreement"] < 99.5
    assert pair.metrics["latency_compile_note"].startswith(
        "the reduced model: compiled (compile) top-1 agrees with eager on"
    )
    assert "latency_compile_note_unreduced" in pair.metrics and pair.metrics["compile_seconds"] > 0
    assert "computes something else" in pair.metrics["latency_compile_note"]
    random = compile_pair(vit, copy.deepcopy(vit), images, [3], "compile", random_weights=True)
    assert "random weights, whose logits are nearly tied" in random.metrics["latency_compile_note"]
    assert "computes something else" not in random.metrics["latency_compile_note"]

    def broken(m, **kw):
        raise RuntimeError("no C++ compiler\nmore")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(BenchError) as e:
        compile_pair(vit, copy.deepcopy(vit), images, [1], "max-autotune")
    assert str(e.value) == (
        "bench.latency.compile=max-autotune: compiling the reduced model failed (RuntimeError: no C++ compiler); "
        "use bench.latency.compile=eager"
    )


def test_a_graph_break_fails_the_compile_instead_of_timing_a_partly_eager_model(vit, images):
    """torch 2.11's dynamo broke pooling's graph at ``min(..., key=...)``: the blocks after the
    break were compiled one token count at a time until the recompile limit, then ran eager, and
    the row looked like a compiled one. Now a graph break is the compile failing, in one line."""
    with pytest.raises(BenchError) as e:
        compile_pair(_Breaking(vit), copy.deepcopy(vit), images, [1], "compile")
    message = str(e.value)
    assert message.startswith("bench.latency.compile=compile: compiling the reduced model failed (")
    assert "\n" not in message and message.endswith("use bench.latency.compile=eager")


def test_a_failed_compile_in_a_job_saves_its_traceback_and_says_where(vit, images, tmp_path, monkeypatch):
    def broken(m, **kw):
        raise ValueError("The argument '-1 + ((0))' is not comparable.")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(compiling_module, "job_output_dir", lambda: tmp_path)
    with pytest.raises(BenchError) as e:
        compile_pair(vit, copy.deepcopy(vit), images, [1], "cudagraphs")
    saved = tmp_path / "compile-traceback.txt"
    assert str(e.value) == (
        "bench.latency.compile=cudagraphs: compiling the reduced model failed (ValueError: The argument "
        f"'-1 + ((0))' is not comparable.; traceback in {saved}); use bench.latency.compile=eager"
    )
    assert "Traceback" in saved.read_text() and "in broken" in saved.read_text()


class _Breaking(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        torch._dynamo.graph_break()
        return self.inner(x)


class _Negated(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return -self.inner(x)


def test_a_compiled_job_records_its_mode_compile_times_and_agreement(tmp_path, monkeypatch):
    """A whole job, compiled (dynamo's eager backend: see the module docstring): the compile time
    of each model apart from its timings, no graph compiled inside a timed loop, top-1 equal to
    eager's, and the mode in the record, the unreduced record, the row and the cache key."""
    monkeypatch.setitem(compiling_module.COMPILE_MODES, "compile", {"backend": "eager"})
    root = image_folder(tmp_path / "val", 2, 1)
    results = tmp_path / "results"
    job_module._BASELINES.clear()
    fast = [a for a in FAST if not a.startswith("model.")]
    model = ["model.name=test_vit", "model.random_init=true", "model.checkpoint=null", "bench.accuracy=false"]
    method = ["method=topk", "method.reducer.blocks=[1,3]", "bench.spectral.enabled=false"]
    latency = ["bench.latency.batch_size=[1,2]", "bench.latency.compile=compile", "bench.scaling.resolutions=[160]"]
    try:
        record = job_module.run_job(
            compose([*model, *method, *fast, *latency, f"data.root={root}", f"results_dir={results}"])
        )
    finally:
        job_module._BASELINES.clear()
    m = record["metrics"]
    assert m["latency_compile"] == "compile" and m["latency_batches"] == [1, 2]
    assert m["compile_seconds"] > 0 and m["compile_seconds_unreduced"] > 0
    assert m["latency_recompiles_b1"] == m["latency_recompiles_b2"] == 0  # warm-up absorbed every compile
    assert m["latency_compile_agreement"] == m["latency_compile_agreement_unreduced"] == 100.0
    assert m["latency_compile_images"] == 2 and "latency_compile_note" not in m
    assert {"speedup_b1", "speedup_b2", "speedup_efficiency_b1", "img_per_s_b1"} <= set(m)
    base = next(r for r in read_records(results) if r["method"] == "none")["metrics"]
    assert base["latency_compile"] == "compile" and base["compile_seconds"] == m["compile_seconds_unreduced"]
    assert base["latency_ms_b1"] == m["latency_ms_baseline_b1"]
    assert set(table(read_records(results))["latency_mode"]) == {"compile"}
    (entry,) = (results / CACHE_DIR).glob("scaling_unreduced-*.pt")
    key = json.loads(torch.load(entry, weights_only=True)["key"])
    assert key["settings"]["compile"] == "compile"


def test_bad_latency_settings_are_one_line_each_and_record_nothing(tmp_path):
    root = image_folder(tmp_path / "val", 2, 1)
    bad = ["device=cpu", "bench.latency.batch_size=[1,0],[],[-3],[2]", "bench.latency.compile=turbo,cudagraphs"]
    out = run_cli(["method=tome", f"data.root={root}", *FAST, *bad], tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 8 and "Traceback" not in out.stderr  # one line per job
    lists = "bench.latency.batch_size must be auto, an integer >= 1 or a non-empty list of them, got"
    assert set(errors) == {
        f"error: {lists} [1, 0]",
        f"error: {lists} []",
        f"error: {lists} [-3]",
        "error: bench.latency.compile must be one of eager, compile, max-autotune, cudagraphs, cpp-wrapper, "
        "got 'turbo'",
        "error: bench.latency.compile=cudagraphs needs a CUDA device (CUDA graphs), but this job runs on cpu; "
        "use bench.latency.compile=compile, max-autotune or cpp-wrapper there",
    }
    assert not (tmp_path / "results").exists()


def test_a_jobs_error_line_is_not_glued_to_the_sweep_bar(tmp_path):
    """With progress bars on (the default), a job's ``error:`` line is written above the
    sweep's bar, on a line of its own, not appended to the bar's line (where a log or a
    terminal showed ``sweep:   0%| ... error: ...``). The value is swept, so each job checks
    its own (a setting every job shares is checked once, before the bar)."""
    root = image_folder(tmp_path / "val", 2, 1)
    with_bars = [o for o in FAST if o != "progress=false"]
    out = run_cli(["method=tome", f"data.root={root}", *with_bars, "bench.latency.compile=turbo,warp"], tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "sweep:" in out.stderr  # the bar was drawn
    lines = out.stderr.splitlines()  # text mode: a bar's carriage returns end lines too
    assert any(line.startswith("error: bench.latency.compile must be one of") for line in lines), out.stderr
    assert not any("job/s]error:" in line for line in lines), out.stderr


# -- inference mode -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*method_names(), "fatr:score=svd"])
def test_a_model_timed_in_inference_mode_still_trains(name):
    """Latency runs every forward in ``torch.inference_mode`` (``_inference``). A reducer that
    kept a tensor made there (a cache) would break a later training forward in the same
    process: inference tensors cannot be saved for backward. The distilled model takes ToMe's
    cached prefix-slot permutation (two prefix tokens); DCT and FATR's SVD score cache constants."""
    method, _, option = name.partition(":")
    overrides = dict([option.split("=")]) if option else {}
    model = apply_reducer(tiny_distilled_vit(depth=12), build_reducer(method, **overrides))  # default schedules
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with inference():
        assert torch.is_inference_mode_enabled()
        eager = model(x)
    model.train()
    out = model(x)
    out.float().square().mean().backward()
    assert any(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), eager)


def test_cuda_graph_timings_record_no_peak_memory(vit, quiet_machine):
    """A CUDA-graph replay allocates nothing (its pool was reserved when it was recorded), so a
    forward's peak cannot be read: None in the record, a dash in the leaderboard, never 0."""
    timer, clock = _scripted([[(10.0, 20.0)] * 5])
    x = torch.randn(2, 3, 32, 32)
    section = LatencyConfig(warmup=1, iters=5, tolerance=None, max_seconds=None, max_iters=100)
    graphs = TimedPair(vit, copy.deepcopy(vit), compiled=False, graphs=True)
    m = measure_batches(graphs, x, [2], section, False, timer, clock)
    assert m["peak_mem_mb"] is None and m["peak_mem_mb_baseline"] is None and m["peak_mem_mb_b2"] is None
    timer, clock = _scripted([[(10.0, 20.0)] * 5])
    assert measure_batches(TimedPair(vit, copy.deepcopy(vit)), x, [2], section, False, timer, clock)["peak_mem_mb"] > 0

    stored = _record("pool", "t1", {"batch_size": [2]}, "cudagraphs", **_timed([2], mode="cudagraphs"), peak_mem_mb=0.0)
    df = table([stored])
    assert "peak_mem_mb" not in df.columns  # the old records' 0.0 is not shown
    eager = _record("pool", "t2", {"batch_size": [2]}, **_timed([2]), peak_mem_mb=5.0)
    assert table([eager])["peak_mem_mb"].tolist() == [5.0]


def test_the_budget_legend_sits_below_the_x_label_in_a_short_panel(tmp_path, monkeypatch):
    """A group of two methods gets the shortest panel; the bar chart's 'MACs target' legend
    used to sit at a share of the panel's height below it, on top of the x axis label."""
    from bench.report import plots

    records = []
    for method in ("none", "a", "b"):
        r = _record(method, "1", {"batch_size": [256]}, **_timed([256]))
        records.append(r)
    seen = {}

    def measured_save(fig, path, *args, **kwargs):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        bars = fig.axes[0]
        seen["label"] = bars.xaxis.label.get_window_extent(renderer)
        seen["ticks"] = [t.get_window_extent(renderer) for t in bars.get_xticklabels() if t.get_text()]
        seen["legend"] = bars.get_legend().get_window_extent(renderer)
        return path

    monkeypatch.setattr(plots, "save", measured_save)
    plots.plot_latency(table(records), tmp_path / "latency.png")
    assert seen["legend"].y1 <= seen["label"].y0, "the legend overlaps the x label"
    assert all(seen["legend"].y1 <= t.y0 for t in seen["ticks"])
