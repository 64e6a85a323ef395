"""Issue 15: measure each unreduced quantity once (the measurement cache), adaptive latency
timing with a busy flag, scaling latency only where it is cheap (the rest extrapolated), the
time breakdown in records and at the end of a sweep, and a terminal the bars share cleanly."""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
from bench_utils import FAST, compose, image_folder
from conftest import build_reducer, tiny_vit

from bench import job as job_module
from bench.config import ModelConfig
from bench.data import ImageSet
from bench.measure import busy as busy_module
from bench.measure import latency as latency_module
from bench.measure import scaling as scaling_module
from bench.measure import spectral as spectral_module
from bench.measure.busy import busy_reason, relative_spread
from bench.measure.cache import CACHE_DIR, MeasurementCache, device_fingerprint, unreduced_cache, weights_fingerprint
from bench.measure.flops import VitShape, analytic_macs, fvcore_macs
from bench.measure.latency import StopRule, measure_latency
from bench.measure.phases import PhaseClock, time_table
from bench.measure.scaling import analytic_gmacs, at_resolution, scaling_metrics
from bench.store import device_name, read_records
from bench.validate import read_config
from methods.identity import NoReduction

# -- the measurement cache ----------------------------------------------------------------------


def _cache(tmp_path: Path, **identity) -> MeasurementCache:
    return MeasurementCache(tmp_path, {"model": "m", "images": "i", **identity})


def test_cache_hit_returns_the_stored_value_without_measuring(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"top5": torch.arange(10).reshape(2, 5), "when": "now"}

    first, hit1 = _cache(tmp_path).get_or_compute("predictions", {"batch_size": 4}, compute)
    second, hit2 = _cache(tmp_path).get_or_compute("predictions", {"batch_size": 4}, compute)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    assert torch.equal(first["top5"], second["top5"]) and second["when"] == "now"
    assert [p.name.startswith("predictions-") for p in (tmp_path / CACHE_DIR).iterdir()] == [True]


@pytest.mark.parametrize(
    "change",
    [
        {"settings": {"batch_size": 8}},
        {"identity": {"images": "another folder listing"}},
        {"identity": {"model": "other weights"}},
        {"identity": {"device": {"threads": 7}}},
    ],
    ids=["settings", "images", "weights", "threads"],
)
def test_cache_misses_when_anything_that_changes_the_numbers_changed(tmp_path, change):
    _cache(tmp_path).store("predictions", {"batch_size": 4}, {"v": 1})
    other = _cache(tmp_path, **change.get("identity", {}))
    assert other.load("predictions", change.get("settings", {"batch_size": 4})) is None
    assert _cache(tmp_path).load("predictions", {"batch_size": 4}) == {"v": 1}


def test_fingerprints_follow_weights_images_and_threads(tmp_path):
    model = tiny_vit()
    fp = weights_fingerprint(model)
    assert weights_fingerprint(copy.deepcopy(model)) == fp
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[0, 0] += 1e-6
    assert weights_fingerprint(model) != fp

    root = image_folder(tmp_path / "val", 1, 2)
    paths = sorted(str(p) for p in root.rglob("*.JPEG"))
    data = ImageSet(torch.zeros(2, 3, 8, 8), torch.tensor([0, 0]), paths, str(root))
    a = unreduced_cache(tmp_path, model, ModelConfig(name="t"), data, torch.device("cpu")).identity
    os.utime(paths[0], ns=(1, 1))  # a replaced image file
    b = unreduced_cache(tmp_path, model, ModelConfig(name="t"), data, torch.device("cpu")).identity
    assert a["images"] != b["images"] and a["weights"] == b["weights"]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = device_fingerprint(torch.device("cpu"))
        torch.set_num_threads(2)
        assert device_fingerprint(torch.device("cpu")) != one
    finally:
        torch.set_num_threads(threads)


def _writer(root: str, worker: int, rounds: int) -> None:
    cache = MeasurementCache(Path(root), {"model": "m"})
    for r in range(rounds):
        cache.store("scaling_unreduced", {"s": 1}, {"worker": worker, "round": r, "rows": list(range(20000))})


def test_concurrent_writers_never_leave_a_half_entry(tmp_path):
    """Four processes rewrite one entry while this one reads it: every read is a whole value
    (the rename is atomic), and no temporary file is left behind."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    reader = MeasurementCache(tmp_path, {"model": "m"})
    seen = 0
    while any(p.is_alive() for p in procs):
        value = reader.load("scaling_unreduced", {"s": 1})
        if value is not None:
            assert value["rows"] == list(range(20000)) and 0 <= value["worker"] < 4
            seen += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert reader.load("scaling_unreduced", {"s": 1})["round"] == 14
    assert [p.name for p in (tmp_path / CACHE_DIR).iterdir()] == [reader.path("scaling_unreduced", {"s": 1}).name]


def test_a_damaged_entry_is_measured_again_with_one_warning(tmp_path, capsys):
    cache = _cache(tmp_path)
    path = cache.store("predictions", {}, {"v": 1})
    path.write_bytes(path.read_bytes()[:20])
    value, hit = cache.get_or_compute("predictions", {}, lambda: {"v": 2})
    assert (value, hit) == ({"v": 2}, False)
    assert capsys.readouterr().err.count("unreadable") == 1
    assert cache.load("predictions", {}) == {"v": 2}


def test_the_code_fingerprint_covers_every_measuring_module():
    """A moved or renamed measuring module must not drop out of the fingerprint unnoticed (the
    cache would then keep numbers measured by older code)."""
    from bench.measure import cache as cache_module

    root = Path(cache_module.__file__).resolve().parents[2]
    assert all((root / entry).exists() for entry in cache_module.CODE)
    covered = {f.relative_to(root).as_posix() for e in cache_module.CODE for f in (root / e).rglob("*.py")}
    covered |= {e for e in cache_module.CODE if e.endswith(".py")}
    for module in ("accuracy", "flops", "latency", "scaling", "spectral", "spectral_metrics", "paper_metrics"):
        assert f"bench/measure/{module}.py" in covered
    assert "methods/tome.py" in covered and "fatr/reducer.py" in covered
    assert len(cache_module.code_fingerprint()) == 32


def test_a_disabled_cache_writes_nothing(tmp_path):
    cache = MeasurementCache(tmp_path, {}, enabled=False)
    assert cache.get_or_compute("predictions", {}, lambda: {"v": 1}) == ({"v": 1}, False)
    assert not (tmp_path / CACHE_DIR).exists()


@pytest.fixture
def quiet_machine(monkeypatch):
    """No load and no spread: the busy flag is tested on its own below."""
    monkeypatch.setattr(latency_module, "load_average", lambda: 0.0)
    monkeypatch.setattr(busy_module, "BUSY_SPREAD", math.inf)


def _forget_this_process():
    """What a new sweep would not have: the in-process baseline and spectral reference."""
    job_module._BASELINES.clear()
    spectral_module._REFERENCE.clear()


def test_a_second_sweep_reuses_the_unreduced_measurements(tmp_path, quiet_machine):
    root = image_folder(tmp_path / "val")
    results = tmp_path / "results"
    overrides = [f"data.root={root}", f"results_dir={results}", *FAST, "bench.scaling.max_seconds_per_point=null"]
    _forget_this_process()
    first = job_module.run_job(compose(["method=tome", *overrides]))
    _forget_this_process()
    second = job_module.run_job(compose(["method=evit", *overrides]))
    _forget_this_process()
    assert "from_cache" not in first["metrics"]
    assert second["metrics"]["from_cache"] == ["scaling_unreduced", "spectral_reference"]
    bases = [r for r in read_records(results) if r["method"] == "none"]
    assert [b["metrics"].get("from_cache") for b in bases] == [None, ["flops", "predictions"]]
    assert bases[0]["metrics"]["top1"] == bases[1]["metrics"]["top1"]
    s1, s2 = first["metrics"], second["metrics"]
    assert s2["scaling_unreduced_from_cache"] and not s1["scaling_unreduced_from_cache"]
    assert s2["scaling_unreduced_measured_at"] == s1["scaling_unreduced_measured_at"]
    assert [r["latency_ms_b1_unreduced"] for r in s2["scaling"]] == [
        r["latency_ms_b1_unreduced"] for r in s1["scaling"]
    ]
    # the unreduced spectral reference is the same numbers, not a re-measurement
    assert s2["fourier_dlog_pi_last_unreduced_images"] == s1["fourier_dlog_pi_last_unreduced_images"]


def test_a_scaling_entry_from_a_busy_machine_is_not_reused(tmp_path, quiet_machine):
    vit, reducer = tiny_vit(), build_reducer("evit", keep_rate=0.7, blocks=[2])
    cache = _cache(tmp_path)
    kw = dict(resolutions=[32, 48], device=torch.device("cpu"), warmup=0, iters=1, show_progress=False, cache=cache)
    first = scaling_metrics(vit, reducer, **kw)
    entry = next((tmp_path / CACHE_DIR).iterdir())
    stored = torch.load(entry, weights_only=True)
    stored["value"]["busy"] = "load 9.0 on 2 CPUs"
    torch.save(stored, entry)
    second = scaling_metrics(vit, reducer, **kw)
    assert not first["scaling_unreduced_from_cache"] and not second["scaling_unreduced_from_cache"]
    third = scaling_metrics(vit, reducer, **kw)  # the fresh (quiet) measurement replaced it
    assert third["scaling_unreduced_from_cache"]
    assert third["scaling_unreduced_measured_at"] == second["scaling_unreduced_measured_at"]


# -- adaptive timing ----------------------------------------------------------------------------


def test_stop_rule():
    rule = StopRule(min_iters=3, tolerance=0.05, max_seconds=10.0, max_iters=6)
    assert rule.reason([1.0, 1.0], 0.0) is None  # never before min_iters
    assert rule.reason([1.0, 1.0, 1.0], 0.0).startswith("spread 0.0%")
    wide = [1.0, 2.0, 1.0, 2.0]
    assert rule.reason(wide, 1.0) is None
    assert rule.reason(wide, 10.0).startswith("time cap 10 s")
    assert rule.reason(wide * 2, 1.0).startswith("iteration cap 6")
    assert StopRule(min_iters=4).reason(wide, 0.0) == "4 iterations"  # no tolerance: a fixed count
    assert relative_spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2.0 / 3.0)


def _scripted(pairs: list[tuple[float, float]]):
    """A timer returning (reduced ms, unreduced ms) per iteration in the alternating call order
    (reduced first on even iterations), and a clock that advances one second per reading."""
    calls: list[float] = []
    for i, (red, ref) in enumerate(pairs):
        calls += [red, ref] if i % 2 == 0 else [ref, red]
    it = iter(calls)
    ticks = iter(range(10_000))
    return (lambda fn: next(it)), (lambda: float(next(ticks)))


@pytest.mark.parametrize(
    "pairs,kw,iters,stop",
    [
        ([(10.0, 20.0)] * 50, {}, 5, "spread 0.0%"),  # steady: the minimum is enough
        (
            [(10.0, 10.0), (10.0, 40.0), (10.0, 10.0), (10.0, 40.0), (10.0, 10.0)] + [(10.0, 20.0)] * 45,
            {},
            13,
            "spread 0.0%",  # noisy start: goes on until the quartiles are both 2.0
        ),
        ([(10.0, 10.0), (10.0, 40.0)] * 25, {"max_seconds": 8.0}, 8, "time cap 8 s"),  # never settles
        ([(10.0, 10.0), (10.0, 40.0)] * 25, {"max_iters": 7}, 7, "iteration cap 7"),
    ],
    ids=["steady", "settles", "time-cap", "iteration-cap"],
)
def test_adaptive_latency_stops_by_its_rule(vit, images, quiet_machine, pairs, kw, iters, stop):
    timer, clock = _scripted(pairs)
    reference = copy.deepcopy(vit)
    m = measure_latency(
        vit, reference, images, 0, 5, show_progress=False, tolerance=0.05, timer=timer, clock=clock, **kw
    )
    assert m["latency_iters"] == iters == len(m["speedup_ratios"])
    assert m["latency_stop"].startswith(stop)
    assert m["speedup_q1"] <= m["speedup"] <= m["speedup_q3"]
    assert m["speedup_spread"] == pytest.approx(relative_spread(m["speedup_ratios"]))


def test_without_tolerance_the_count_is_fixed(vit, images, quiet_machine):
    timer, clock = _scripted([(10.0, 10.0), (10.0, 40.0)] * 10)
    m = measure_latency(vit, copy.deepcopy(vit), images, 0, 6, show_progress=False, timer=timer, clock=clock)
    assert m["latency_iters"] == 6 and m["latency_stop"] == "6 iterations"


@pytest.mark.parametrize("warmup", [0, 1, 2])
def test_peak_memory_read_in_the_warm_up_equals_a_separate_reading(vit, images, quiet_machine, warmup):
    """The last warm-up forward doubles as the memory-profiled one (no extra forward); without
    warm-up the reading comes after the timed loop. Either way it is the same number."""
    reference = tiny_vit(depth=4)
    m = measure_latency(vit, reference, images, warmup, 2, show_progress=False)
    assert m["peak_mem_mb"] == latency_module.peak_memory_mb(vit, images, False) > 0
    assert m["peak_mem_mb_baseline"] == latency_module.peak_memory_mb(reference, images, False) > 0
    forwards = []
    handle = vit.register_forward_hook(lambda *a: forwards.append(1))
    try:
        measure_latency(vit, reference, images, warmup, 2, show_progress=False)
    finally:
        handle.remove()
    assert len(forwards) == warmup + 2 + (1 if warmup == 0 else 0)


@pytest.mark.parametrize("warmup", [0, 1])
def test_scaling_timing_reads_memory_in_its_warm_up_too(vit, images, warmup):
    forwards = []
    handle = vit.register_forward_hook(lambda *a: forwards.append(1))
    try:
        one = latency_module.time_forward(vit, images, warmup, 3)
    finally:
        handle.remove()
    assert len(forwards) == warmup + 3 + (1 if warmup == 0 else 0)
    assert len(forwards) == scaling_module._forwards(warmup, 3)  # what the scaling budget predicts
    assert one["peak_mem_mb"] == latency_module.peak_memory_mb(vit, images, False)
    assert latency_module.time_forward(vit, images, warmup, 3, memory=False)["peak_mem_mb"] is None


def test_busy_machine_is_flagged(vit, images, monkeypatch):
    cpu = torch.device("cpu")
    cpus = busy_module.cpu_count()
    assert busy_reason(cpu, [10.0, 10.1, 9.9], load=cpus + 2.0) == f"load {cpus + 2.0:.1f} on {cpus} CPUs"
    assert busy_reason(cpu, [10.0, 10.1, 9.9], load=0.1) is None
    assert busy_reason(cpu, [10.0, 14.0, 10.0, 15.0, 9.0], load=0.1).startswith("unreduced timings spread")
    monkeypatch.setattr(latency_module, "load_average", lambda: cpus + 3.0)
    timer, clock = _scripted([(10.0, 20.0)] * 10)
    m = measure_latency(vit, copy.deepcopy(vit), images, 0, 3, show_progress=False, timer=timer, clock=clock)
    assert m["latency_busy"] and m["latency_busy_reason"].startswith("load") and m["load_avg"] == cpus + 3.0


# -- scaling: analytic everywhere, latency where cheap ------------------------------------------


@pytest.mark.parametrize(
    "name,kw",
    [
        ("tome", {"r": 4}),
        ("evit", {"keep_rate": 0.6, "blocks": [1, 3]}),
        ("fatr", {"blocks": [1, 3], "dc_grid": [2, 1]}),
    ],
)
def test_analytic_gmacs_match_fvcore_at_another_resolution(name, kw):
    vit = tiny_vit()
    reducer = build_reducer(name, **kw)
    big = at_resolution(vit, reducer, 64)
    counted = fvcore_macs(big, torch.randn(1, 3, 64, 64)) / 1e9
    assert analytic_gmacs(vit, reducer, 64) == pytest.approx(counted, rel=0.02)
    assert analytic_gmacs(vit, NoReduction(), 64) == pytest.approx(
        analytic_macs(VitShape.of(vit), NoReduction(), 16 * 16) / 1e9
    )


def test_scaling_extrapolates_beyond_the_budget(quiet_machine):
    vit, reducer = tiny_vit(), build_reducer("tome", r=4)
    sizes = [32, 48, 64, 128, 256]
    kw = dict(device=torch.device("cpu"), warmup=0, iters=1, show_progress=False, claim_resolution=256)
    cheap = scaling_metrics(vit, reducer, sizes, max_seconds_per_point=1e-9, **kw)  # only the base fits
    rows = cheap["scaling"]
    assert [r["extrapolated"] for r in rows] == [False, True, True, True, True]
    assert cheap["scaling_measured_resolutions"] == [32]
    assert [r["gmacs"] for r in rows] == pytest.approx([analytic_gmacs(vit, reducer, s) for s in sizes])
    base = rows[0]
    for r in rows[1:]:  # at the base point's time per GMAC
        assert r["latency_ms_b1"] == pytest.approx(base["latency_ms_b1"] * r["gmacs"] / base["gmacs"])
        assert "peak_mem_mb_b1" not in r
    assert math.isnan(cheap["alpha_latency"])  # one measured point fits nothing
    assert not cheap["claim_measured"]
    assert cheap["claim_latency_ms_extrapolated"] == pytest.approx(rows[-1]["latency_ms_b1"])

    full = scaling_metrics(vit, reducer, sizes[:3], max_seconds_per_point=None, **kw)
    assert not any(r["extrapolated"] for r in full["scaling"]) and not math.isnan(full["alpha_latency"])
    assert full["claim_resolution"] == 256 and not full["claim_measured"]


def test_scaling_table_and_plot_mark_extrapolated_points(tmp_path, quiet_machine):
    from bench.report.scaling import scaling_section

    vit, reducer = tiny_vit(), build_reducer("tome", r=4)
    m = scaling_metrics(
        vit, reducer, [32, 48, 64], torch.device("cpu"), warmup=0, iters=1, show_progress=False,
        max_seconds_per_point=1e-9, claim_resolution=64,
    )  # fmt: skip
    record = {"method": "tome", "budget": {"macs_ratio_target": 0.65}, "metrics": m, "device": "CPU test"}
    (tmp_path / "leaderboard.md").write_text("")
    paths = scaling_section([record], tmp_path)
    md = (tmp_path / "leaderboard.md").read_text()
    assert paths == [tmp_path / "scaling.png"] and paths[0].stat().st_size > 0
    assert "| tome @0.65 | 32 px | – |" in md and "× (extrapolated) |" in md
    assert "an extrapolation, not a measurement" in md


# -- where the time went --------------------------------------------------------------------------


def test_records_keep_the_time_by_phase_and_the_sweep_tables_it(tmp_path):
    root = image_folder(tmp_path / "val")
    results = tmp_path / "results"
    _forget_this_process()
    record = job_module.run_job(compose(["method=evit", f"data.root={root}", f"results_dir={results}", *FAST]))
    _forget_this_process()
    phases = record["metrics"]["seconds_by_phase"]
    assert set(phases) == {"setup", "decode", "accuracy", "flops", "latency", "spectral", "scaling"}
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= record["seconds"] + 0.05
    base = next(r for r in read_records(results) if r["method"] == "none")
    assert set(base["metrics"]["seconds_by_phase"]) == {"accuracy", "flops"}
    assert base["metrics"]["latency_measured_with"] == "evit"  # not timed against itself again
    assert base["metrics"]["latency_ms"] == record["metrics"]["latency_ms_baseline"]
    table = time_table(read_records(results)).splitlines()
    assert table[0] == "where the time went (seconds):"
    assert table[1].split() == [
        "job",
        "setup",
        "decode",
        "accuracy",
        "flops",
        "latency",
        "spectral",
        "scaling",
        "total",
    ]
    assert [line.split()[0] for line in table[2:]] == ["unreduced", "evit", "total"]
    assert float(table[-1].split()[-1]) == pytest.approx(
        sum(phases.values()) + sum(base["metrics"]["seconds_by_phase"].values()), abs=0.2
    )


def test_phase_clock_accumulates():
    clock = PhaseClock()
    with clock.phase("a"):
        pass
    clock.add("a", 1.0)
    clock.add("b", 0.5)
    assert clock.record()["a"] >= 1.0 and clock.record()["b"] == 0.5
    assert json.dumps(clock.record())


# -- a terminal shared by bars and log lines ------------------------------------------------------


def test_log_lines_go_above_the_bar_not_onto_it():
    from tqdm import tqdm

    from bench.terminal import BarSafeHandler

    def launch_line(handler_class) -> str:
        buf = io.StringIO()
        bar = tqdm(total=3, desc="sweep", file=buf, ncols=60, mininterval=0)
        bar.update(1)
        log = logging.getLogger(f"test-terminal-{handler_class.__name__}")
        log.propagate = False
        log.handlers = [handler_class(buf)]
        log.warning("Launching 3 jobs locally")
        bar.close()
        text = buf.getvalue()
        return text[: text.index("Launching")]

    glued = launch_line(logging.StreamHandler)
    assert glued.rstrip().endswith("it/s]")  # the bug: the log line continues the bar's line
    assert launch_line(BarSafeHandler).endswith("\r")  # the bar's line is cleared first, then redrawn below


def compose_with_hydra(overrides: list[str]):
    from bench_utils import REPO
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "bench" / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides, return_hydra_config=True)


def test_the_config_routes_hydra_logging_through_the_bar_safe_handler():
    cfg = compose_with_hydra([])
    for group in ("hydra_logging", "job_logging"):
        assert cfg.hydra[group].handlers.console["class"] == "bench.terminal.BarSafeHandler"


# -- a machine slower than usual ------------------------------------------------------------------


def _timed(ms_by_batch: dict[int, float], model="deit_tiny_patch16_224", mode="eager", commit="abc1234", busy=()):
    metrics = {"latency_batches": sorted(ms_by_batch)}
    for n, ms in ms_by_batch.items():
        metrics[f"latency_ms_baseline_b{n}"] = ms
        metrics[f"latency_busy_b{n}"] = n in busy
    config = {"bench": {"latency": {"compile": mode, "amp": False, "threads": None}}, "model": {"img_size": None}}
    return {"model": model, "device": "CPU X (2 threads)", "config": config, "metrics": metrics, "git_commit": commit}


def test_an_unreduced_timing_far_above_the_stores_median_at_the_same_settings_is_slower_than_usual():
    now = _timed({1: 25.0, 32: 600.0})
    settings = busy_module.timing_settings(now)
    usual = [_timed({1: ms, 32: 580.0}) for ms in (17.0, 17.5, 21.0)]  # a quiet day: median 17.5
    store = [
        *usual,
        _timed({1: 12.0, 32: 300.0}, busy=(1, 32)),  # busy records are no yardstick
        _timed({1: 5.0, 32: 100.0}, mode="compile"),  # nor other settings
        _timed({1: 5.0, 32: 100.0}, model="deit_small_patch16_224"),
        {"model": "deit_tiny_patch16_224", "metrics": "not a dict"},
    ]
    reasons = busy_module.slower_than_usual(now["metrics"], settings, store)
    assert reasons == {
        1: "unreduced 25.0 ms, 43% slower than the median of the 3 recorded here at these settings (17.5 ms)"
    }  # batch 32 is 3% over: usual
    quiet_max = _timed({1: 21.5, 32: 580.0})["metrics"]  # 23% over the median: a quiet day's spread
    assert busy_module.slower_than_usual(quiet_max, settings, store) == {}
    assert busy_module.slower_than_usual(now["metrics"], settings, usual[:2]) == {}  # two are no "usual"
    metrics = {**now["metrics"], "latency_busy": True, "latency_busy_reason": "batch 32: spread 12%"}
    metrics["latency_busy_b32"], metrics["latency_busy_reason_b32"] = True, "spread 12%"
    busy_module.mark_busy_batches(metrics, reasons)
    assert metrics["latency_busy"] and metrics["latency_busy_b1"]
    assert metrics["latency_busy_reason"] == f"batch 1: {reasons[1]}; batch 32: spread 12%"


def test_a_job_on_a_machine_slower_than_its_store_remembers_is_flagged_busy(tmp_path, capsys):
    root = image_folder(tmp_path / "val")
    results = tmp_path / "results"
    results.mkdir()
    overrides = ["method=evit", f"data.root={root}", f"results_dir={results}", *FAST, "bench.scaling.enabled=false"]
    cfg = compose(overrides)
    # earlier records at the same settings whose unreduced forward took a microsecond: today's is far slower
    identity = job_module.job_identity(read_config(cfg))
    earlier = {"model": cfg.model.name, "device": device_name(torch.device("cpu")), "config": identity}
    earlier["metrics"] = {"latency_ms_baseline_b2": 0.001, "latency_busy_b2": False}
    (results / "runs.jsonl").write_text((json.dumps({**earlier, "method": "evit"}) + "\n") * 3)
    _forget_this_process()
    record = job_module.run_job(cfg)
    _forget_this_process()
    m = record["metrics"]
    assert m["latency_busy"] and m["latency_busy_b2"]
    assert "slower than the median of the 3 recorded here at these settings (0.0 ms)" in m["latency_busy_reason"]
    assert "latency measured on a slower machine than usual" in capsys.readouterr().err


def test_resume_busy_redoes_only_the_configs_whose_latest_record_is_busy(tmp_path):
    """``resume=busy``: a sweep rerun on a host that is quiet at times fills in what a busy spell
    spoiled, and leaves what was measured quietly alone (the latest record of a config counts)."""
    from bench.store import append_record, recorded_hashes

    def rec(h, busy, t):
        return {"config_hash": h, "timestamp": t, "metrics": {"latency_busy": busy}}

    for r in (rec("quiet", False, "1"), rec("spoiled", True, "1"), rec("fixed", True, "1"), rec("fixed", False, "2")):
        append_record(tmp_path, r)
    append_record(tmp_path, {"config_hash": "no_latency", "timestamp": "1", "metrics": {"top1": 80.0}})
    assert recorded_hashes(tmp_path) == {"quiet", "spoiled", "fixed", "no_latency"}
    assert recorded_hashes(tmp_path, redo_busy=True) == {"quiet", "fixed", "no_latency"}
