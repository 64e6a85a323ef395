"""Where a job's weights and images come from on a machine with or without local copies
(bench/sources.py): the resolution order, the Imagenette fallback with a stubbed download, and
one fast error line offline with nothing local."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from bench_utils import FAST, RANDOM_WEIGHTS, compose, image_folder, run_cli

import bench.sources as sources
from bench.errors import BenchError
from bench.sources import download_imagenette, resolve_images, resolve_sources, resolve_weights

NAME = "deit_tiny_patch16_224"


@pytest.fixture
def bare(tmp_path, monkeypatch):
    """A user's machine: no environment variables, no shared folder, an empty cache, no network."""
    for var in ("FATR_CHECKPOINT", "FATR_DATA_ROOT", "FATR_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FATR_SHARED", str(tmp_path / "no-shared"))
    monkeypatch.setenv("FATR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "reachable", lambda url, timeout=0: False)
    monkeypatch.setattr(sources, "cached_hub_file", lambda name: None)
    return tmp_path


def shared_folder(root: Path) -> Path:
    (root / "weights").mkdir(parents=True)
    (root / "weights" / f"{NAME}.safetensors").write_bytes(b"x")
    image_folder(root / "data" / "imagenet-val-1300", 1, 1)
    return root


def model_cfg(*overrides: str):
    return compose([*overrides]).model


def test_weights_resolution_order(bare, monkeypatch):
    shared_folder(bare / "shared")
    monkeypatch.setenv("FATR_SHARED", str(bare / "shared"))
    monkeypatch.setenv("FATR_CHECKPOINT", "/env/w.pt")
    explicit = resolve_weights(model_cfg("model.checkpoint=/given.pt", "model.pretrained=true"))
    assert (explicit.checkpoint, explicit.origin) == ("/given.pt", "model.checkpoint")
    hub = resolve_weights(model_cfg("model.pretrained=true"))
    assert hub.pretrained and hub.checkpoint is None and hub.origin == "model.pretrained=true"
    assert resolve_weights(model_cfg("model.random_init=true")).random_init
    assert resolve_weights(model_cfg()).checkpoint == "/env/w.pt"
    monkeypatch.delenv("FATR_CHECKPOINT")
    assert resolve_weights(model_cfg()).checkpoint == str(bare / "shared" / "weights" / f"{NAME}.safetensors")
    # the shared file is DeiT-Tiny's: another model falls through to the hub
    other = resolve_weights(model_cfg("model.name=vit_small_patch16_224"))
    assert other.pretrained and other.checkpoint is None and other.origin.startswith("no local weights")


def test_images_resolution_order(bare, monkeypatch):
    shared_folder(bare / "shared")
    monkeypatch.setenv("FATR_SHARED", str(bare / "shared"))
    monkeypatch.setenv("FATR_DATA_ROOT", "/env/val")
    assert resolve_images(compose(["data.root=/given"]).data).root == "/given"
    assert resolve_images(compose([]).data).root == "/env/val"
    monkeypatch.delenv("FATR_DATA_ROOT")
    assert resolve_images(compose([]).data).root == str(bare / "shared" / "data" / "imagenet-val-1300")
    monkeypatch.setenv("FATR_SHARED", str(bare / "elsewhere"))
    fallback = resolve_images(compose([]).data)
    assert fallback.origin == "imagenette" and fallback.needs_download
    assert fallback.root == str(bare / "cache" / "imagenette2-320" / "val")


def fake_imagenette(folder: Path) -> None:
    image_folder(folder / "imagenette2-320" / "val", 2, 1)


def test_imagenette_downloaded_once_and_used(bare, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(sources, "reachable", lambda url, timeout=0: True)
    monkeypatch.setattr(sources, "_torchvision_fetch", lambda folder: calls.append(folder) or fake_imagenette(folder))
    cfg = resolve_sources(compose(["model.random_init=true"]))
    assert Path(cfg.data.root) == bare / "cache" / "imagenette2-320" / "val"
    assert sorted(p.name for p in Path(cfg.data.root).iterdir())  # class folders, ImageNet wnids
    assert "10-class subset" in capsys.readouterr().err
    resolve_sources(compose(["model.random_init=true"]))
    assert len(calls) == 1
    assert not list((bare / "cache").glob(".download-*"))  # the work folder is gone


def test_interrupted_download_leaves_nothing(bare):
    def broken(folder: Path) -> None:
        (folder / "imagenette2-320" / "val" / "n01440764").mkdir(parents=True)
        raise ConnectionResetError("connection reset")

    with pytest.raises(BenchError, match="could not download Imagenette .*nothing partial was kept"):
        download_imagenette(bare / "cache", broken)
    assert list((bare / "cache").iterdir()) == []
    got = download_imagenette(bare / "cache", fake_imagenette)
    assert got.is_dir()


def test_offline_with_nothing_local_is_one_line_naming_every_way(bare):
    t0 = time.perf_counter()
    with pytest.raises(BenchError) as e:
        resolve_sources(compose([]))
    message = str(e.value)
    assert "\n" not in message
    for way in ("model.checkpoint=PATH", "FATR_CHECKPOINT=PATH", "data.root=PATH", "FATR_DATA_ROOT=PATH", "network"):
        assert way in message
    assert time.perf_counter() - t0 < 5


def test_hub_cache_needs_no_network(bare, monkeypatch):
    monkeypatch.setattr(sources, "cached_hub_file", lambda name: "/hub/cache/model.safetensors")
    cfg = resolve_sources(compose(["data.root=/given"]), announce=False)
    assert cfg.model.pretrained and cfg.model.checkpoint is None


def test_explicit_pretrained_without_hub_is_refused(bare):
    with pytest.raises(BenchError, match="no weights: the timm hub .* vit_small_patch16_224; give weights with"):
        resolve_sources(compose(["model.name=vit_small_patch16_224", "model.pretrained=true", "data.root=/x"]))


def test_model_without_hub_weights_is_named(bare):
    name = "vit_tiny_nonexistent_model"
    assert sources.hub_problem(name) == f"timm has no pretrained weights for {name}"


def test_cli_offline_fresh_clone_is_one_line(tmp_path):
    env = {"FATR_SHARED": str(tmp_path / "none"), "FATR_CHECKPOINT": "", "FATR_DATA_ROOT": "", "FATR_OFFLINE": "1"}
    env["FATR_CACHE_DIR"] = str(tmp_path / "cache")
    t0 = time.perf_counter()
    out = run_cli(["method=fatr,tome,evit", "progress=false"], tmp_path, env=env, timeout=120)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: no weights: ") and "FATR_DATA_ROOT=PATH" in errors[0]
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "results" / "runs.jsonl").exists()
    assert time.perf_counter() - t0 < 60


def test_record_names_the_resolved_sources(bare, monkeypatch):
    from bench.job import run_job

    root = image_folder(bare / "val", 1, 1)
    monkeypatch.setenv("FATR_DATA_ROOT", str(root))
    record = run_job(compose(["method=tome", f"results_dir={bare / 'r'}", *FAST]))
    assert record["config"]["data"]["root"] == str(root.resolve())
    assert record["config"]["model"]["checkpoint"] == str(RANDOM_WEIGHTS)
