"""Per-image outcomes, the leaderboard's paired statistics, rows that never mix, and
``python -m bench.compare``: on constructed run stores whose answers are known, and on one real
(random-weight) job."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_utils import FAST, REPO, compose, image_folder
from conftest import build_reducer

from bench.compare import main as compare_main
from bench.errors import BenchError
from bench.leaderboard import latest_per_config, table, write_leaderboard
from bench.measure.outcomes import Outcomes, load_outcomes, save_outcomes
from bench.report.stats import discordance
from bench.store import append_record, config_hash, read_records
from methods import TokenReducer
from methods.identity import NoReduction

N = 400
IDS = np.array([f"n{c:08d}/img_{i}.JPEG" for i, c in enumerate(np.arange(N) % 40)])
LABELS = (np.arange(N) % 40).astype(np.int16)


def _flip(x: np.ndarray, idx) -> np.ndarray:
    y = x.copy()
    y[list(idx)] = ~y[list(idx)]
    return y


def _store(results, method, budget, correct, base, *, device="CPU A", images=N, outcomes=True, speed=None, **extra):
    ids, labels = IDS[:images], LABELS[:images]
    config = {
        "method": {"name": method},
        "model": {"name": "m"},
        "data": {"root": "/d/val"},
        "budget": {"macs_ratio": budget},
        "bench": {},
        "device": "cpu",
        "images": images,
    }
    digest = config_hash({**config, "device_name": device})
    agree = correct == base  # a stand-in for "same top-1 as the unreduced model"
    metrics = {"top1": 100 * correct.mean(), "num_images": images, "gmacs": 0.8, "gmacs_analytic": 0.8}
    if method != "none":
        metrics["agreement"] = 100 * agree.mean()
    if speed:
        metrics.update(speedup=speed[0], speedup_q1=speed[1], speedup_q3=speed[2])
    metrics.update(extra)
    if outcomes:
        o = Outcomes(ids, labels.copy(), labels, correct, agree, correct)
        metrics["outcomes_file"] = save_outcomes(results, digest, o)
    append_record(
        results,
        {
            "config_hash": digest,
            "method": method,
            "variant": "",
            "model": "m",
            "data_root": "/d/val",
            "num_images": images,
            "budget": {"macs_ratio_target": budget, **({"knob": "keep_rate", "knob_value": 0.7} if budget else {})},
            "config": config,
            "metrics": metrics,
            "device": device,
            "git_commit": "abc",
            "timestamp": f"2026-01-01T00:00:{len(read_records(results)):02d}",
        },
    )
    return digest


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(0)
    base = rng.random(N) < 0.81
    right, wrong = np.flatnonzero(base), np.flatnonzero(~base)
    a = _flip(base, list(right[:12]) + list(wrong[:8]))  # 4 images below the unreduced model
    b = _flip(a, list(np.flatnonzero(a)[:6]) + list(np.flatnonzero(~a)[:4]))  # 2 below a: a tie
    c = _flip(a, np.flatnonzero(a)[:80])  # 80 below a: clearly worse
    _store(results, "none", None, base, base)
    _store(results, "a", 0.65, a, base, speed=(1.20, 1.10, 1.30))
    _store(results, "b", 0.65, b, base, speed=(1.25, 1.22, 1.35))
    _store(results, "c", 0.65, c, base, speed=(1.60, 1.55, 1.70))
    _store(results, "old", 0.65, a, base, outcomes=False, gmacs_analytic=None)
    _store(results, "a", None, b, base)  # own knob
    # the same configuration on another machine, and a 200-image run: separate rows and groups
    _store(results, "none", None, base, base, device="CPU B")
    _store(results, "a", 0.65, c, base, device="CPU B")
    _store(results, "none", None, base[:200], base[:200], images=200)
    _store(results, "a", 0.65, a[:200], base[:200], images=200)
    write_leaderboard(results)
    return results, {"base": base, "a": a, "b": b, "c": c}


def _section(md: str, heading: str) -> str:
    start = md.index(heading)
    nxt = md.find("\n## ", start + 1)
    return md[start : nxt if nxt > 0 else None]


def test_outcomes_round_trip(tmp_path):
    o = Outcomes(IDS[:5], LABELS[:5], LABELS[:5], np.ones(5, bool), np.zeros(5, bool), np.ones(5, bool))
    rel = save_outcomes(tmp_path, "abc", o)
    assert re.fullmatch(r"preds/abc-[0-9a-f]{8}\.npz", rel) and not list((tmp_path / "preds").glob(".*"))
    back = load_outcomes(tmp_path, rel)
    assert back.same_images(o) and back.correct.all() and not back.agree.any()
    with pytest.raises(BenchError, match="per-image outcomes file missing"):
        load_outcomes(tmp_path, "preds/nope.npz")


def test_rows_never_mix_across_devices_or_image_counts(store):
    results, _ = store
    df = table(latest_per_config(read_records(results)))
    assert len(df[(df.method == "a") & (df.budget == 0.65)]) == 3  # CPU A 400, CPU B 400, CPU A 200
    md = (results / "leaderboard.md").read_text()
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert sorted(headings) == [
        "## m on val (200 images), CPU A",
        "## m on val (400 images), CPU A",
        "## m on val (400 images), CPU B",
    ]
    # each group's Δ vs unreduced is against its own unreduced row
    small = _section(md, "## m on val (200 images), CPU A")
    assert "| a |" in small and "| b |" not in small


def test_paired_statistics_ranks_ties_and_marks(store):
    results, x = store
    md = _section((results / "leaderboard.md").read_text(), "## m on val (400 images), CPU A")
    assert "Resampling: **images**" in md
    rows = {line.split(" | ")[1]: line for line in md.splitlines() if line.startswith("| 1") or line.startswith("| 3")}
    assert rows["a"].startswith("| 1= |") and "**best**" in rows["a"]
    assert rows["b"].startswith("| 1= |") and "tied with best" in rows["b"]
    assert rows["c"].startswith("| 3 |") and "tied with best" not in rows["c"] and "below best" in rows["c"]
    t = discordance(x["c"], x["a"])
    assert (t.only_a, t.only_b) == (0, 80)
    assert f"| {t.p_value:.3f} |" in rows["c"] or "| <0.001 |" in rows["c"]
    assert "no per-image outcomes" in md  # the old record still renders, marked
    assert "Own knob" in md
    assert "Speedups whose interquartile ranges overlap (not ordered by this run): b, a." in md
    assert "How many images a difference needs" in md
    for bad in ("nan", "NaN", "None"):
        assert not re.search(rf"\b{bad}\b", md), bad
    header = next(line for line in md.splitlines() if line.startswith("| method |")).split(" | ")
    old = next(line for line in md.splitlines() if line.startswith("| old | 0.65 |")).split(" | ")
    assert old[header.index("GMACs (analytic)")] == "–" and old[header.index("GMACs")] == "0.800"


def test_class_resampling_is_named(store, tmp_path):
    results, _ = store
    write_leaderboard(results, resample="classes")
    try:
        assert "Resampling: **whole classes (cluster bootstrap)**" in (results / "leaderboard.md").read_text()
    finally:
        write_leaderboard(results)
    with pytest.raises(BenchError, match="stats.resample must be one of images, classes"):
        write_leaderboard(results, resample="pixels")


def test_plots_are_written_per_group(store):
    results, _ = store
    for name in ("pareto.png", "differences.png", "latency.png"):
        assert (results / name).stat().st_size > 10_000, name


def test_the_leaderboard_links_every_figure_of_its_folder_under_its_opening_paragraph(store):
    results, _ = store
    lines = (results / "leaderboard.md").read_text().splitlines()
    figures = next(line for line in lines if line.startswith("Figures: "))
    assert lines.index(figures) == 4  # title, blank, opening paragraph, blank
    linked = re.findall(r"\]\(([^)]+)\)", figures)
    assert linked == sorted(p.name for p in results.glob("*.png")) and "pareto.png" in linked


def test_compare_two_runs(store, capsys):
    results, x = store
    args = ["--results-dir", str(results), "--images", "400", "--device", "CPU A"]
    assert compare_main(["a@0.65", "c@0.65", *args]) == 0
    out = capsys.readouterr().out
    assert "Δ top-1 (A − B): +20.00 points" in out
    assert "McNemar: both" in out and "only A 80, only B 0" in out
    assert "Classes that differ most" in out and len(re.findall(r"^  n\d{8}", out, re.M)) == 10


@pytest.mark.parametrize(
    "specs,extra,message",
    [
        (["a@0.65", "c@0.65"], [], r"'a@0.65' is ambiguous: 3 runs match"),
        (["zzz", "c"], [], r"no recorded run matches 'zzz'"),
        (["old", "a@0.65"], ["--images", "400", "--device", "CPU A"], "has no per-image outcomes"),
        (["a@0.65", "a@own"], ["--device", "CPU A", "--images", "400"], None),
        (["a@half", "c"], [], "the budget after @ must be a number"),
        (["a@0.65", "c"], ["--images", "0"], r"--images must be a positive number of images, got 0"),
        (
            ["a@0.65", "c"],
            ["--images", "7"],
            r"no recorded run has 7 images \(recorded: 200, 400 images; on CPU A; CPU B\)$",
        ),
        (["a@0.65", "c"], ["--device", "h200"], r"no recorded run has a device matching 'h200'"),
        (["a@0.65", "c"], ["--seed", "-1"], r"stats.seed must be a non-negative integer, got -1"),
    ],
)
def test_compare_bad_input_is_one_line(store, capsys, specs, extra, message):
    results, _ = store
    code = compare_main([*specs, "--results-dir", str(results), *extra])
    err = capsys.readouterr().err
    if message is None:
        assert code == 0, err
        return
    assert code == 2 and re.search(message, err) and err.startswith("error: ") and len(err.splitlines()) == 1


def test_compare_refuses_runs_on_different_images(store, capsys):
    results, _ = store
    from bench.leaderboard import result_key

    recs = latest_per_config(read_records(results))
    small = next(r for r in recs if r["method"] == "a" and r["num_images"] == 200)
    big = next(r for r in recs if r["method"] == "c")
    assert result_key(small) != result_key(big)
    code = compare_main([small["config_hash"], big["config_hash"], "--results-dir", str(results)])
    assert code == 2 and "on different images" in capsys.readouterr().err


def test_a_real_job_stores_its_per_image_outcomes(tmp_path):
    from bench.job import run_job

    root = image_folder(tmp_path / "val")
    results = tmp_path / "results"
    overrides = ["method=tome", "bench.flops=false", "bench.latency.enabled=false", "budget.macs_ratio=null"]
    overrides += ["bench.scaling.enabled=false", "bench.spectral.enabled=false"]
    record = run_job(compose([*overrides, f"data.root={root}", f"results_dir={results}", *FAST]))
    base = next(r for r in read_records(results) if r["method"] == "none")
    for r in (base, record):
        o = load_outcomes(results, r["metrics"]["outcomes_file"])
        assert len(o) == 6 and o.image_ids[0].count("/") == 1 and o.image_ids[0].startswith("n")
        assert 100 * o.correct.mean() == pytest.approx(r["metrics"]["top1"])
        assert o.top5_hit.sum() >= o.correct.sum()
    assert load_outcomes(results, base["metrics"]["outcomes_file"]).agree.all()
    assert 100 * o.agree.mean() == pytest.approx(record["metrics"]["agreement"])


def test_latency_records_the_spread_of_its_per_iteration_speedups(vit, images):
    import copy

    from bench.measure.busy import quartiles
    from bench.measure.latency import measure_latency
    from methods import apply_reducer

    reference = copy.deepcopy(vit)
    apply_reducer(vit, build_reducer("tome", r=8))
    m = measure_latency(vit, reference, images, warmup=1, iters=5, show_progress=False)
    assert len(m["speedup_ratios"]) == 5
    assert m["speedup_q1"] <= m["speedup"] <= m["speedup_q3"]
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 4.0)
    assert quartiles([1.5]) == (1.5, 1.5)


def test_bad_statistics_options_fail_before_any_work(tmp_path):
    from bench.job import run_job

    cfg = compose([f"results_dir={tmp_path / 'r'}", "data.root=/nonexistent", "stats.resample=pixels", *FAST])
    with pytest.raises(BenchError, match="stats.resample must be one of images, classes, got 'pixels'"):
        run_job(cfg)


class EveryOther(TokenReducer):
    """A user's reducer: keeps every other patch token in block 1."""

    def reduces_at(self, block):
        return block == 1

    def reduce(self, state, block):
        from methods.tokens import keep_tokens

        idx = torch.cat([torch.arange(state.num_prefix), torch.arange(state.num_prefix, state.num_tokens, 2)])
        return keep_tokens(state, idx.expand(state.x.shape[0], -1))


class EveryOtherCounted(EveryOther):
    """The same, with the token counts that its reduce produces."""

    def token_counts(self, num_prefix, num_patches, depth):
        n, half = num_prefix + num_patches, num_prefix + (num_patches + 1) // 2
        return [(n, n), (n, half)] + [(half, half)] * (depth - 2)


def test_flops_refuse_a_reducer_whose_token_counts_disagree_with_its_forward():
    from conftest import tiny_vit

    from bench.measure.flops import macs_report
    from methods import apply_reducer

    x = torch.randn(1, 3, 32, 32)
    model = apply_reducer(tiny_vit(), EveryOther())
    message = (
        "reducer EveryOther: token_counts says 65 tokens enter block 1 and 65 leave it, but a real forward has 65 "
        "and 33; override token_counts to match reduce (MACs and budgets are computed from it)"
    )
    with pytest.raises(BenchError) as refused:
        macs_report(model, model.token_reducer, x)
    assert str(refused.value) == message

    model = apply_reducer(tiny_vit(), EveryOtherCounted())
    report = macs_report(model, model.token_reducer, x)
    assert report["gmacs_analytic"] == pytest.approx(report["gmacs"], rel=0.02)
    plain = macs_report(apply_reducer(tiny_vit(), NoReduction()), NoReduction(), x)
    assert report["gmacs"] < 0.8 * plain["gmacs"]


def test_user_runs_default_to_a_git_ignored_folder(monkeypatch):
    monkeypatch.delenv("FATR_RESULTS_DIR", raising=False)
    assert compose([]).results_dir == "results/local"
    ignored = subprocess.run(["git", "check-ignore", "-q", "results/local/runs.jsonl"], cwd=REPO)
    assert ignored.returncode == 0
    tracked_but_ignored = subprocess.run(
        ["git", "ls-files", "-ci", "--exclude-standard"], cwd=REPO, capture_output=True, text=True
    )
    assert tracked_but_ignored.stdout == ""


def test_writing_published_results_does_not_mark_records_dirty(tmp_path):
    from bench.store import git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "runs.jsonl").write_text("")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    append_record(tmp_path / "results", {"config_hash": "x"})
    assert not git_commit(tmp_path).endswith("-dirty")
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path).endswith("-dirty")


def test_publish_names_its_commands():
    out = subprocess.run([sys.executable, "-m", "bench.publish", "--dry-run"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    commands = [line for line in out.stdout.splitlines() if line.startswith("python -m bench.run")]
    from bench.publish import REFERENCE_SWEEPS

    assert len(commands) == len(REFERENCE_SWEEPS) and all(c.endswith("results_dir=results") for c in commands)
    assert any("method.reducer.score=svd" in c for c in commands), "the FATR fidelity variants are published"


def test_compare_tells_the_fine_tuned_model_from_the_off_the_shelf_one():
    from bench.compare import describe_run, resolve

    def record(digest: str, finetuned: bool) -> dict:
        config = {"method": {"name": "tome"}, "data": {"root": "/val"}}
        r = {"config_hash": digest, "method": "tome", "budget": {"macs_ratio_target": 0.65}, "num_images": 10}
        r |= {"device": "CPU A", "timestamp": "2026-01-01", "metrics": {"top1": 70.0}, "config": config}
        if finetuned:
            config["finetuned"] = {"recipe": "quick"}
            r["finetune"] = {"recipe_name": "quick", "loss": "kd", "images_seen": 100}
        return r

    shelf, tuned = record("aaaa11112222", False), record("bbbb33334444", True)
    records = [shelf, tuned]
    assert resolve("tome@0.65", records)["config_hash"] == "aaaa11112222"
    assert resolve("tome@0.65+ft", records)["config_hash"] == "bbbb33334444"
    assert resolve("bbbb3333", records)["config_hash"] == "bbbb33334444"  # a hash names either
    assert "+ft (fine-tuned: quick, loss kd, 100 images seen)" in describe_run(tuned)
    assert "+ft" not in describe_run(shelf)
    with pytest.raises(BenchError, match=r"no recorded run matches 'evit\+ft'; recorded runs include: tome @0.65"):
        resolve("evit+ft", records)


def test_fresh_publish_carries_the_fine_tuned_records_over(tmp_path, monkeypatch):
    """``--fresh`` archives the store; the fine-tuned records (which publish cannot rerun) come
    back unchanged with their outcome files, the others stay in the archive."""
    from bench.publish import move_aside

    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    (results / "preds").mkdir(parents=True)
    for name in ("a.npz", "b.npz"):
        (results / "preds" / name).write_bytes(name.encode())
    plain = {"config_hash": "aaaa", "metrics": {"outcomes_file": "preds/a.npz"}}
    tuned = {"config_hash": "bbbb", "metrics": {"outcomes_file": "preds/b.npz"}, "finetune": {"recipe": "quick"}}
    append_record(results, plain)
    append_record(results, tuned)
    archive = move_aside(results)
    assert archive is not None and archive.is_relative_to(Path("results/local"))
    assert [r["config_hash"] for r in read_records(results)] == ["bbbb"]
    assert read_records(results)[0] == tuned
    assert (results / "preds" / "b.npz").read_bytes() == b"b.npz" and not (results / "preds" / "a.npz").exists()
    assert [r["config_hash"] for r in read_records(archive)] == ["aaaa", "bbbb"]
    assert (archive / "preds" / "a.npz").exists()
    assert move_aside(tmp_path / "empty") is None


def test_publish_stops_after_a_sweep_that_recorded_nothing(tmp_path, monkeypatch, capsys):
    """A bad override refuses every sweep alike: publish runs the first, sees it record nothing,
    and says so once instead of failing the same way in every later sweep. A first sweep that
    failed in some jobs but recorded others, or a later one that recorded nothing, does not stop
    the ones after it."""
    import bench.leaderboard
    import bench.publish as publish

    results = tmp_path / "speed"
    ran: list[list[str]] = []

    def fake_run(cmd, records_added: int):
        ran.append(cmd)
        for i in range(records_added):
            append_record(results, {"config_hash": f"{len(ran)}-{i}"})
        return subprocess.CompletedProcess(cmd, 2)

    monkeypatch.setattr(bench.leaderboard, "write_leaderboard", lambda d: None)
    monkeypatch.setattr(publish.subprocess, "run", lambda cmd: fake_run(cmd, 0))
    assert publish.main(["--speed", "--results-dir", str(results), "bench.latency.compile=turbo"]) == 2
    err = capsys.readouterr().err
    assert len(ran) == 1 and f"the first sweep recorded nothing; the {len(publish.SPEED_SWEEPS) - 1} sweep(s)" in err
    assert f"1 sweep(s) failed ({len(publish.SPEED_SWEEPS) - 1} not run)" in err

    for first_adds in (1, 0):  # the first sweep records a job, then every later one records nothing
        ran.clear()
        monkeypatch.setattr(publish.subprocess, "run", lambda cmd, n=first_adds: fake_run(cmd, n if not ran else 0))
        assert publish.main(["--speed", "--results-dir", str(results)]) == 2
        assert len(ran) == (len(publish.SPEED_SWEEPS) if first_adds else 1)
        assert ("not run" in capsys.readouterr().err) == (not first_adds)
