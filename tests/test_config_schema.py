"""The typed configuration (``bench/config.py``): the YAML files compose into the schema, a job
reads it once and hands each measurement its own section, a value of the wrong type is one
``error:`` line, and every published record's ``config_hash`` is still the hash of its config
(a ``resume=true`` rerun skips it)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
from bench_utils import REPO, compose, run_cli
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from bench.config import (
    BenchConfig,
    Config,
    DataConfig,
    LatencyConfig,
    MethodConfig,
    ModelConfig,
    ScalingConfig,
    SpectralConfig,
    VisualizeAppConfig,
)
from bench.errors import BenchError
from bench.job import MEASUREMENTS, job_identity
from bench.store import config_hash
from bench.validate import config_error, read_config, validate_settings

PUBLISHED = REPO / "results" / "runs.jsonl"


def _literal(v: object) -> str:
    """``v`` as a Hydra override value."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return f"'{v}'"
    if isinstance(v, list):
        return "[" + ",".join(_literal(x) for x in v) + "]"
    raise TypeError(f"no override for {v!r}")


def record_overrides(config: dict) -> list[str]:
    """The command-line overrides that give a record's stored config: its method group, then
    every stored value (``method.reducer._target_`` comes with the group)."""
    out = [f"method={config['method']['name']}", f"device={config['device']}"]

    def walk(prefix: str, node: dict) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            elif k != "_target_":
                out.append(f"{prefix}{k}={_literal(v)}")

    for section in ("model", "data", "budget", "bench"):
        walk(f"{section}.", config[section])
    walk("method.reducer.", config["method"]["reducer"])
    return out


def _layout(node: object, prefix: str = "") -> set[str]:
    if not isinstance(node, dict):
        return {prefix}
    return {k for key, v in node.items() for k in _layout(v, f"{prefix}.{key}" if prefix else key)}


def published_records() -> list[dict]:
    """Published records whose config today's YAML files can give: the same keys in every
    section (older records predate settings such as ``bench.latency.compile``, and a
    fine-tuned one is not a ``bench.run`` config) and the method's current arguments."""
    records = [json.loads(line) for line in PUBLISHED.read_text().splitlines() if line.strip()]
    default = OmegaConf.to_container(compose([]), resolve=True)
    sections = ("model", "data", "budget", "bench")
    out = []
    for r in records:
        c = r["config"]
        if set(c) != {*sections, "method", "device"}:
            continue
        if any(_layout(c[s]) != _layout(default[s]) for s in sections):
            continue
        method_file = REPO / "bench" / "conf" / "method" / f"{c['method']['name']}.yaml"
        if not method_file.is_file() or set(OmegaConf.load(method_file).reducer) != set(c["method"]["reducer"]):
            continue
        out.append(r)
    return out


def test_published_records_keep_their_hash_through_the_typed_config():
    """Each record's config composed from its overrides, typed and hashed as a job hashes it:
    exactly its stored ``config_hash``. And the stored config itself, typed, hashes the same
    (no field added, no int turned float)."""
    records = published_records()
    assert len({r["method"] for r in records}) >= 3 and len(records) >= 10, "too few published records to check"
    by_method: dict[str, list] = {}
    for r in records:  # two records per method (and configuration shape) keep the test quick
        by_method.setdefault(r["method"], []).append(r)
    for r in [r for rs in by_method.values() for r in (rs[0], rs[-1])]:
        cfg = read_config(compose(record_overrides(r["config"])))
        assert isinstance(cfg, Config) and isinstance(cfg.bench.latency, LatencyConfig)
        assert config_hash(job_identity(cfg)) == r["config_hash"], r["config_hash"]
        rebuilt = read_config({k: v for k, v in r["config"].items()})
        assert config_hash(job_identity(rebuilt)) == r["config_hash"], r["config_hash"]


def test_numbers_keep_the_type_they_were_written_with():
    """``max_seconds: 10`` must stay 10, not 10.0: the hash is of the JSON text."""
    cfg = read_config(compose(["bench.latency.tolerance=1", "budget.macs_ratio=0.5"]))
    assert cfg.bench.latency.max_seconds == 10 and isinstance(cfg.bench.latency.max_seconds, int)
    assert isinstance(cfg.bench.latency.tolerance, int) and isinstance(cfg.budget.macs_ratio, float)
    assert json.dumps(asdict(cfg.bench.latency), sort_keys=True).count('"max_seconds": 10,') == 1


def test_the_schema_defaults_are_the_yaml_values(monkeypatch):
    """The YAML files are what users read and override; the dataclasses' defaults are the same
    values, so a section built in code is the default job's."""
    monkeypatch.delenv("FATR_RESULTS_DIR", raising=False)
    composed = read_config(compose(["method=fatr"]))
    default = Config()
    for section in ("model", "data", "bench", "budget", "stats"):
        assert asdict(getattr(composed, section)) == asdict(getattr(default, section)), section
    for key in ("resume", "results_dir", "device", "seed", "progress", "cache"):
        assert getattr(composed, key) == getattr(default, key), key
    assert composed.method.name == "fatr" and composed.method.reducer["_target_"] == "fatr.reducer.FATR"


@pytest.mark.parametrize(
    "group,names",
    [
        ("method", sorted(p.stem for p in (REPO / "bench" / "conf" / "method").glob("*.yaml"))),
        ("model", sorted(p.stem for p in (REPO / "bench" / "conf" / "model").glob("*.yaml"))),
    ],
)
def test_every_group_option_composes_into_the_schema(group, names):
    for name in names:
        cfg = read_config(compose([f"{group}={name}"]))
        assert isinstance(cfg.method, MethodConfig) and isinstance(cfg.model, ModelConfig)
        if group == "method":
            assert cfg.method.name == OmegaConf.load(REPO / "bench" / "conf" / "method" / f"{name}.yaml").name


def test_each_measurement_gets_its_own_typed_section():
    bench = read_config(compose([])).bench
    sections = {m.phase: m.section(bench) for m in MEASUREMENTS}
    assert sections["accuracy"] is True and sections["flops"] is True
    assert isinstance(sections["latency"], LatencyConfig) and isinstance(sections["spectral"], SpectralConfig)
    assert isinstance(sections["scaling"], ScalingConfig) and isinstance(bench, BenchConfig)
    assert isinstance(read_config(compose([])).data, DataConfig)


@pytest.mark.parametrize(
    "override,message",
    [
        ("bench.latency.iters=abc", "bench.latency.iters must be an integer >= 1, got 'abc'"),
        ("bench.latency.max_seconds=abc", "bench.latency.max_seconds must be a number in (0, inf] or null, got 'abc'"),
        ("data.limit=2.5", "data.limit must be an integer >= 1 or null, got 2.5"),
        ("model.img_size=[1]", "model.img_size must be an integer >= 1 or null, got [1]"),
        ("bench.spectral.enabled=maybe", "bench.spectral.enabled must be true or false, got 'maybe'"),
        ("bench.scaling.resolutions=abc", "bench.scaling.resolutions must be a non-empty list of positive integers, "
         "got 'abc'"),
        ("stats.n_boot=abc", "stats.n_boot: Value 'abc' of type 'str' could not be converted to Integer"),
    ],
)  # fmt: skip
def test_a_value_of_the_wrong_type_is_refused_with_the_settings_message(override, message):
    with pytest.raises(ConfigCompositionException) as e:
        compose(["method=tome", override])
    assert str(config_error(e.value)) == message


def test_resume_is_true_false_or_busy():
    """``resume`` is typed by its check, not the schema (it takes a word as well as a flag)."""
    for value in (True, False, "busy"):
        validate_settings(read_config(compose(["method=tome", f"resume={str(value).lower()}"])))
    with pytest.raises(BenchError) as e:
        validate_settings(read_config(compose(["method=tome", "resume=abc"])))
    assert str(e.value) == "resume must be true, false or busy (redo the jobs whose latest record is busy), got 'abc'"


def test_an_unknown_setting_or_group_option_is_named_and_a_malformed_override_is_left_to_hydra():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["method=tome", "bench.latency.no_such_setting=1"])
    assert str(config_error(e.value)).startswith("bench.latency.no_such_setting is not a setting; bench.latency has: ")
    with pytest.raises(ConfigCompositionException) as e:
        compose(["method=no_such_method"])
    assert str(config_error(e.value)).startswith("method=no_such_method: no such method; choose one of ats, dct, ")
    with pytest.raises(ConfigCompositionException) as e:
        compose(["method=tome", "model=deit_huge"])
    assert str(config_error(e.value)) == (
        "model=deit_huge: no such model; choose one of deit_base, deit_small, deit_tiny, vit_large"
    )
    assert config_error(ConfigCompositionException("a malformed override")) is None
    with pytest.raises(ConfigCompositionException) as e:
        compose(["method=tome", "bench.latency=3"])
    assert str(config_error(e.value)) == (
        "bench.latency is a section of settings, not a value; set one of bench.latency.enabled, "
        "bench.latency.batch_size, bench.latency.compile, bench.latency.warmup, bench.latency.iters, "
        "bench.latency.tolerance, bench.latency.max_seconds, bench.latency.max_iters, bench.latency.amp, "
        "bench.latency.threads"
    )


def test_a_value_given_to_a_section_names_the_section_in_a_plain_tree_too():
    """Merging ``{"budget": 0.5}`` into the schema fails without naming the key ("config: Merge
    error: float is not a subclass of BudgetConfig"); the message names it and its settings."""
    with pytest.raises(
        BenchError, match=r"^budget is a section of settings, not a value; set one of budget.macs_ratio"
    ):
        read_config({"budget": 0.5})
    with pytest.raises(BenchError, match=r"^bench.latency is a section of settings, not a value; set one of bench."):
        read_config({"bench": {"latency": None}})
    assert read_config({"method": {"name": "tome", "reducer": {"r": 3}}}).method.reducer == {"r": 3}  # open section


def test_a_plain_tree_is_typed_at_the_door_with_the_same_messages():
    """``bench.finetune`` hands ``run_job`` a plain tree: typed there, a wrong type refused in one line."""
    cfg = read_config({"method": {"name": "tome", "reducer": {"_target_": "methods.tome.ToMe"}}, "device": "cpu"})
    assert cfg.bench.latency.iters == 5 and cfg.method.reducer == {"_target_": "methods.tome.ToMe"}
    with pytest.raises(BenchError, match=r"^bench\.latency\.iters must be an integer >= 1, got 'abc'$"):
        read_config({"bench": {"latency": {"iters": "abc"}}})
    assert read_config(cfg) is cfg


def test_the_visualize_config_adds_its_section_and_keeps_the_job_values():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "bench" / "conf"), version_base="1.3"):
        cfg = hydra_compose("visualize", overrides=["method=tome", "visualize.images=2", "budget.macs_ratio=0.7"])
    assert OmegaConf.get_type(cfg) is VisualizeAppConfig
    assert cfg.method.name == "tome" and cfg.budget.macs_ratio == 0.7 and cfg.visualize.images == 2
    assert cfg.model.name == "deit_tiny_patch16_224" and cfg.bench.latency.iters == 5


@pytest.mark.parametrize(
    "args",
    [["method=tome", "bench.latency.iters=abc"], ["method=tome,evit", "bench.latency.iters=abc,5"]],
    ids=["setting", "swept value"],
)
def test_a_wrong_type_on_the_command_line_is_one_error_line_and_status_2(tmp_path: Path, args):
    out = run_cli([*args, "progress=false"], tmp_path)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stderr[-2000:]
    assert errors == ["error: bench.latency.iters must be an integer >= 1, got 'abc'"]
    assert "Traceback" not in out.stderr and "HYDRA_FULL_ERROR" not in out.stderr
    assert not (tmp_path / "results").exists()


def test_a_misspelt_setting_on_the_command_line_names_the_sections_settings(tmp_path: Path):
    out = run_cli(["method=tome", "bench.latency.itrs=5", "progress=false"], tmp_path)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stderr[-2000:]
    assert errors == [
        "error: bench.latency.itrs is not a setting; bench.latency has: enabled, batch_size, compile, warmup, "
        "iters, tolerance, max_seconds, max_iters, amp, threads"
    ]
    assert "Traceback" not in out.stderr and "HYDRA_FULL_ERROR" not in out.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench.latency.iters=abc"], "bench.latency.iters must be an integer >= 1, got 'abc'"),
        (["bench.latency.itrs=5"], "bench.latency.itrs is not a setting; bench.latency has: "),
        (["model=deit_huge"], "model=deit_huge: no such model; choose one of deit_base, deit_small, deit_tiny"),
        (["finetune=nope"], "finetune=nope: no such finetune; choose one of calibrate, paper, quick"),
        (
            ["budget=0.5"],
            "budget is a section of settings, not a value; set one of budget.macs_ratio, budget.tolerance",
        ),
    ],
    ids=["wrong type", "misspelt", "group option", "finetune option", "a value for a section"],
)
def test_in_a_sweep_of_methods_a_composition_error_is_its_own_line(tmp_path: Path, args, message):
    """``python -m bench.run method=fatr,tome,evit`` with a bad setting: Hydra swallows the
    composition error while reading the run mode and then reports the comma list as ambiguous
    ("Ambiguous value for argument 'method=fatr,tome,evit'", exit 1); the real error is reported."""
    module = "bench.finetune" if args[0].startswith("finetune") else "bench.run"
    out = run_cli(["method=fatr,tome,evit", *args, "progress=false"], tmp_path, module=module)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith(f"error: {message}") and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "tree, key",
    [
        ({"model": {"nme": "x"}}, "model.nme"),
        ({"bench": {"latency": {"foo": 1}}}, "bench.latency.foo"),  # what ``+bench.latency.foo=1`` composes
        ({"foo": 1}, "foo"),
        ({"method": {"name": "m", "reducer": {"anything": 1}}, "hydra": {"x": 1}}, None),  # open sections
    ],
)
def test_keys_the_schema_lacks_are_refused_by_name(tree, key):
    from bench.errors import BenchError
    from bench.validate import first_misfit_key

    assert first_misfit_key(OmegaConf.create(tree), Config) == key
    if key is not None:
        with pytest.raises(BenchError, match=rf"^{re.escape(key)} is not a setting; "):
            read_config(OmegaConf.create(tree))
