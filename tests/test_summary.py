"""Numbers the README and docs quote are generated from the run store, never copied by hand
(bench/report/summary.py): the blocks are rewritten from SUMMARY.md, and the published ones
must equal what the records give today."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from bench.leaderboard import SUMMARY_FILE, latest_per_config, table
from bench.report.significance import add_statistics, primary_group, record_group
from bench.report.summary import (
    SECTIONS,
    documents,
    group_rows,
    headline,
    paper_rows,
    read_sections,
    stale_blocks,
    summary_markdown,
    summary_sections,
    sync_blocks,
)
from bench.store import read_run_records

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"


def _row(method, budget, top1, images=100, label=None, **kw):
    base = dict(
        label=label or method,
        method=method,
        model="m",
        dataset="d",
        images=images,
        device="cpu",
        latency_mode="eager",
        latency_precision="fp32",
        budget=budget,
        top1=top1,
        gmacs=1.0,
    )
    return {**base, **kw}


def test_headline_takes_the_main_group_the_headline_budget_and_plain_methods():
    df = pd.DataFrame(
        [
            _row("none", None, 80.0),
            _row("tome", 0.65, 79.0, d_unreduced=-1.0, top1_tied="best"),
            _row("fatr", 0.65, 78.0, d_unreduced=-2.0, top1_tied="tied"),
            _row("fatr", 0.65, 77.0, label="fatr (dc_grid=2)", d_unreduced=-3.0),  # a variant: not a headline row
            _row("evit", 0.5, 76.0, d_unreduced=-4.0),  # another budget
            _row("tome", 0.65, 10.0, images=5),  # a smaller group
        ]
    )
    group = ("m", "d", 100, "cpu", "eager", "fp32")
    assert len(group_rows(df, group)) == 5
    table_rows = [line for line in headline(df, group) if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0] for r in table_rows] == ["| none (unreduced)", "| tome", "| fatr"]
    assert "-2.00" in table_rows[2] and "tied" in table_rows[2]


def test_sections_render_from_sparse_tables():
    """A store with accuracy but no FLOPs, no paired statistics or no image count still renders."""
    sparse = pd.DataFrame([_row("none", None, 80.0, images=None), _row("tome", 0.65, 79.0, images=None)])
    assert "| tome | 79.00" in summary_sections(sparse, ("m", "d", None, "cpu", "eager", "fp32"))["headline"]
    assert summary_sections(pd.DataFrame(), None)["headline"].startswith("No accuracy records")
    latency_only = pd.DataFrame([_row("none", None, None), _row("ppt", None, None)]).drop(columns="top1")
    assert summary_sections(latency_only, ("m", "d", 100, "cpu", "eager", "fp32"))["papers"]


def test_sync_rewrites_blocks_and_stale_blocks_finds_them(tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text("intro\n<!-- summary:headline -->\nold numbers\n<!-- /summary:headline -->\nend\n")
    sections = {"headline": "new numbers\n"}
    assert stale_blocks(doc, sections) == ["headline"]
    assert sync_blocks(doc, sections)
    assert doc.read_text() == "intro\n<!-- summary:headline -->\nnew numbers\n<!-- /summary:headline -->\nend\n"
    assert stale_blocks(doc, sections) == [] and not sync_blocks(doc, sections)
    assert stale_blocks(doc, {}) == ["headline"], "a block naming no section is stale"


def test_paper_file_names_known_methods_and_a_source_for_each():
    methods = {p.stem for p in (REPO / "bench/conf/method").glob("*.yaml")}
    for row in paper_rows():
        assert row["method"] in methods and row["source"]
        if row["top1"]:
            float(row["top1"])
            assert row["model"], "a reported number says on which model"
        else:
            assert not row["gflops"], "a cost without its accuracy says nothing"


@pytest.fixture(scope="module")
def published_sections() -> dict[str, str]:
    if not (RESULTS / "runs.jsonl").is_file():
        pytest.skip("no published run store in results/")
    records = [r for r in latest_per_config(read_run_records(RESULTS)) if "finetune" not in r]
    return summary_sections(add_statistics(table(records), RESULTS), record_group(primary_group(records)[0]))


def test_published_summary_is_what_the_records_give(published_sections):
    """Regenerating SUMMARY.md from runs.jsonl changes nothing; else rerun
    ``python -m bench.leaderboard results --docs``."""
    assert (RESULTS / SUMMARY_FILE).read_text() == summary_markdown(published_sections)


def test_numbers_quoted_in_readme_and_docs_match_the_store(published_sections):
    stale = {p.name: stale_blocks(p, published_sections) for p in documents(REPO) if p.is_file()}
    assert {k: v for k, v in stale.items() if v} == {}, "run python -m bench.leaderboard results --docs"
    quoted = {name for p in documents(REPO) if p.is_file() for name in read_sections(p)}
    assert "headline" in quoted and quoted <= set(SECTIONS)


def test_headline_says_what_an_empty_speed_cell_means():
    """A batch size some rows were never timed at shows `–`, and the line under the table says
    why and where every method is timed at it; with every cell filled it says nothing of it."""
    group = ("m", "d", 100, "cpu", "eager", "fp32")
    rows = [
        _row("none", None, 80.0),
        _row(
            "tome",
            0.65,
            79.0,
            d_unreduced=-1.0,
            latency_ms_b1=9.0,
            speedup_b1=1.1,
            latency_ms_b32=90.0,
            speedup_b32=1.4,
        ),
        _row(
            "fatr",
            0.65,
            78.0,
            d_unreduced=-2.0,
            latency_ms_b1=None,
            speedup_b1=None,
            latency_ms_b32=80.0,
            speedup_b32=1.5,
        ),
    ]
    text = "\n".join(headline(pd.DataFrame(rows), group))
    assert "`–` under speedup (b=1):" in text and "results/speed/" in text
    assert "speedup (b=32):" not in text
    rows[2].update(latency_ms_b1=8.0, speedup_b1=1.2)
    assert "`–` under" not in "\n".join(headline(pd.DataFrame(rows), group))


def test_headline_gives_the_range_of_the_unreduced_forward_its_speedups_divide():
    """Each speedup is a ratio to the unreduced forward timed in the same job: the line under
    the table gives that forward's range per batch size, so a busy host's slower jobs show."""
    group = ("m", "d", 100, "cpu", "eager", "fp32")
    timed = dict(latency_ms_b1=9.0, speedup_b1=1.1, latency_ms_b32=90.0, speedup_b32=1.4)
    rows = [
        _row("none", None, 80.0, latency_ms_baseline_b1=99.0),  # its own job: not a ratio's reference
        _row(
            "tome", 0.65, 79.0, d_unreduced=-1.0, latency_ms_baseline_b1=17.46, latency_ms_baseline_b32=500.0, **timed
        ),
        _row(
            "fatr", 0.65, 78.0, d_unreduced=-2.0, latency_ms_baseline_b1=24.04, latency_ms_baseline_b32=500.04, **timed
        ),
    ]
    text = "\n".join(headline(pd.DataFrame(rows), group))
    assert (
        "Each speedup divides by the unreduced forward timed in its own job: 17.5–24.0 ms at batch 1, "
        "500.0 ms at batch 32 (a busier host reads slower)."
    ) in text
    for row in rows:  # records from before the baseline was kept: no sentence
        row.pop("latency_ms_baseline_b1", None), row.pop("latency_ms_baseline_b32", None)
    assert "divides by" not in "\n".join(headline(pd.DataFrame(rows), group))


def test_docs_are_synced_only_from_the_folder_they_quote(tmp_path, capsys):
    """``--docs`` on another folder (``results/speed``, a scratch store) would put that folder's
    headline into the README: refused in one line, before anything is written."""
    from bench.leaderboard import main

    (tmp_path / "runs.jsonl").write_text("")
    assert main([str(tmp_path), "--docs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --docs rewrites the README and docs from ") and "\n" not in err
    assert f"{tmp_path} is another (drop --docs" in err
    assert list(tmp_path.iterdir()) == [tmp_path / "runs.jsonl"]
