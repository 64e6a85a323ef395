"""Fine-tuning on tiny random ViTs (CPU): the loss falls, the right weights train, resumed and
distributed runs equal the plain one, fine-tuned checkpoints evaluate like any weights, and
the leaderboard's fine-tuned section."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench_utils import FAST, RANDOM_WEIGHTS, REPO, compose, image_folder, run_cli
from conftest import build_reducer, method_arguments, method_names, tiny_vit
from omegaconf import OmegaConf
from PIL import Image

import bench.train.trainer as trainer_module
from bench.errors import BenchError
from bench.finetune_job import loss_curve, run_finetune, set_drop_path
from bench.leaderboard import write_leaderboard
from bench.store import append_record, read_records
from bench.train.data import (
    SeededImages,
    StepBatches,
    _posterize,
    check_disjoint,
    list_train_images,
    train_transform,
)
from bench.train.finetuned import read_finetuned, save_finetuned, save_reducer_state
from bench.train.trainer import LAST, METRICS, Recipe, read_metrics, train
from methods import apply_reducer, remove_reducer

TINY_RECIPE = dict(
    name="tiny",
    images=32,
    batch_size=8,
    micro_batch=4,
    opt="adamw",
    lr=1e-3,
    weight_decay=0.05,
    sched="cosine",
    min_lr=1e-5,
    ema_decay=0.9,
    loss="ce_kd",
    train="all",
    checkpoint_every=2,
    num_workers=0,
)
KNOBS = {
    "none": {},
    "tome": {"r": 8},
    "tofu": {"r": 8},
    "pitome": {"ratio": 0.8},
    "fatr": {"blocks": [1, 3], "keep_rate": 0.5, "dc_grid": [2, 1]},
}


def reducer_for(method: str):
    """The method on the 6-block tiny ViT: reduction blocks inside it, a strong keep rate."""
    if method in KNOBS:
        return build_reducer(method, **KNOBS[method])
    args = method_arguments(method)
    return build_reducer(method, **{k: v for k, v in (("blocks", [1, 3]), ("keep_rate", 0.5)) if k in args})


def tiny_run(folder, method: str = "fatr", drop_path: float = 0.0):
    """A teacher, its reduced student and augmented training images, as a fresh process makes them."""
    teacher = tiny_vit(num_classes=1000)
    student = copy.deepcopy(teacher)
    set_drop_path(student, drop_path)
    apply_reducer(student, reducer_for(method))
    images = list_train_images(folder, need_labels=True)
    return student, teacher, SeededImages(images, train_transform(student, True, "rand-m9-mstd0.5-inc1"), seed=0)


class FixedImages(torch.utils.data.Dataset):
    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key):
        return self.x[key[1]], int(self.y[key[1]])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("ft") / "train", n_classes=2, per_class=4)


def losses(out_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(Path(out_dir) / METRICS)]


# -- the loop --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(method_names()))
def test_loss_falls_on_a_fixed_batch(method, tmp_path):
    teacher = tiny_vit()
    student = copy.deepcopy(teacher)
    apply_reducer(student, reducer_for(method))
    recipe = Recipe(**{**TINY_RECIPE, "images": 96, "batch_size": 8, "lr": 3e-3, "sched": "none", "ema_decay": None})
    train(student, teacher, FixedImages(), recipe, tmp_path, {}, progress=False)
    curve = losses(tmp_path)
    assert len(curve) == 12 and max(curve[-3:]) < 0.85 * curve[0], curve


def test_reducer_parameters_get_gradients_and_train_reducer_freezes_the_rest(tmp_path):
    teacher = tiny_vit()
    student = copy.deepcopy(teacher)
    # an aggressive schedule, so the reduced model is far enough from its teacher for ω and the
    # DC positional term to have something to correct
    apply_reducer(student, build_reducer("fatr", blocks=[1, 2], dc_grid=[2, 1], keep_rate=0.3))
    params = dict(student.token_reducer.named_parameters())
    assert params, "FATR has trainable parameters"
    x = FixedImages().x
    with torch.no_grad():
        target = teacher(x).log_softmax(-1)
    loss = torch.nn.functional.kl_div(student(x).log_softmax(-1), target, log_target=True, reduction="batchmean")
    loss.backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    student.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    recipe = Recipe(
        **{**TINY_RECIPE, "images": 48, "opt": "adam", "lr": 0.005, "loss": "kd", "train": "reducer", "sched": "none"}
    )
    train(student, teacher, FixedImages(), recipe, tmp_path, {}, progress=False)
    after = student.state_dict()
    for k, v in before.items():
        if k.startswith("token_reducer."):
            assert not torch.equal(after[k], v), f"{k} did not train"
        else:
            assert torch.equal(after[k], v), f"{k} changed with train=reducer"
    curve = losses(tmp_path)
    assert curve[-1] < curve[0], curve


def test_unreduced_control_with_kd_stays_where_it_started(tmp_path):
    """Student = teacher: the distillation gradient is round-off, which must not become
    learning-rate-sized Adam steps (it does when the loss is computed in float32)."""
    teacher = tiny_vit()
    student = copy.deepcopy(teacher)
    apply_reducer(student, reducer_for("none"))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    recipe = Recipe(**{**TINY_RECIPE, "images": 32, "loss": "kd", "weight_decay": 0.0, "ema_decay": None})
    train(student, teacher, FixedImages(), recipe, tmp_path, {}, progress=False)
    moved = max((student.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    assert moved < 1e-7, moved  # lr is 1e-3: a round-off-driven Adam step would move weights by ~1e-3


def test_norm_mode_trains_norms_biases_and_reducer_only():
    model = tiny_vit()
    apply_reducer(model, reducer_for("fatr"))
    count = trainer_module.select_trainable(model, "norm")
    on = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.0.norm1.weight" in on and "blocks.0.attn.qkv.bias" in on and "token_reducer.omega1" in on
    assert "blocks.0.attn.qkv.weight" not in on and "pos_embed" not in on
    assert count == sum(p.numel() for n, p in model.named_parameters() if n in on)
    plain = tiny_vit()
    apply_reducer(plain, reducer_for("tome"))
    with pytest.raises(BenchError, match="ToMe has no trainable parameters"):
        trainer_module.select_trainable(plain, "reducer")


def test_step_batches_cover_each_epoch_once_for_any_split():
    def keys(micro, world):
        out = []
        for rank in range(world):
            s = StepBatches(10, batch=4, micro=micro, world=world, rank=rank, seed=1, start_step=0, steps=5)
            out += [k for b in s for k in b]
        return sorted(out)

    one = keys(4, 1)
    assert one == keys(2, 1) == keys(1, 2) == keys(2, 2)
    assert sorted(i for e, i in one if e == 0) == list(range(10))  # epoch 0 complete, then epoch 1 begins
    resumed = StepBatches(10, 4, 2, 1, 0, seed=1, start_step=3, steps=5)
    full = StepBatches(10, 4, 2, 1, 0, seed=1, start_step=0, steps=5)
    assert list(resumed) == list(full)[6:]
    with pytest.raises(BenchError, match="not a multiple"):
        StepBatches(10, batch=6, micro=4, world=1, rank=0, seed=0, start_step=0, steps=1)


def _interrupt_at(monkeypatch, call: int, exc: type[BaseException]) -> None:
    real = trainer_module.finetune_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise exc("stop")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "finetune_loss", flaky)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_and_resumed_equals_uninterrupted(exc, folder, tmp_path, monkeypatch):
    """A crash resumes from the last periodic checkpoint, Ctrl-C from the last completed step;
    either way the weights, the EMA and the per-step losses equal an uninterrupted run's, bit
    for bit (drop-path on, so the random state must be restored too)."""
    recipe = Recipe(**{**TINY_RECIPE, "images": 40, "checkpoint_every": 2 if exc is RuntimeError else 100})
    student, teacher, data = tiny_run(folder, drop_path=0.2)
    whole = train(student, teacher, data, recipe, tmp_path / "whole", {"k": 1}, progress=False)

    student, teacher, data = tiny_run(folder, drop_path=0.2)
    with monkeypatch.context() as m:
        _interrupt_at(m, 7, exc)  # the first micro-batch of step 4 (2 micro-batches a step)
        with pytest.raises(exc):
            train(student, teacher, data, recipe, tmp_path / "cut", {"k": 1}, progress=False)
    saved = torch.load(tmp_path / "cut" / LAST, weights_only=True)
    assert saved["step"] == (2 if exc is RuntimeError else 3)
    student, teacher, data = tiny_run(folder, drop_path=0.2)
    resumed = train(student, teacher, data, recipe, tmp_path / "cut", {"k": 1}, resume=True, progress=False)

    assert resumed.steps == whole.steps == 5
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.weights == "ema"
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    assert [r["step"] for r in read_metrics(tmp_path / "cut" / METRICS)] == [1, 2, 3, 4, 5]


def test_resume_refuses_another_configuration_and_a_fresh_start_refuses_to_overwrite(tmp_path):
    teacher = tiny_vit()
    student = copy.deepcopy(teacher)
    recipe = Recipe(**{**TINY_RECIPE, "images": 8, "batch_size": 8, "micro_batch": 8})
    ident = {"recipe": {"lr": 1e-3}, "method": "none"}
    train(student, teacher, FixedImages(), recipe, tmp_path, ident, progress=False)
    before = (tmp_path / LAST).read_bytes()
    with pytest.raises(BenchError, match=r"another configuration \(differs in: recipe.lr\)"):
        train(student, teacher, FixedImages(), recipe, tmp_path, {**ident, "recipe": {"lr": 2e-3}}, resume=True)
    with pytest.raises(BenchError, match="exists: continue it with resume=true"):
        train(student, teacher, FixedImages(), recipe, tmp_path, ident)
    assert (tmp_path / LAST).read_bytes() == before


def test_torchrun_two_processes_match_one_process(folder, tmp_path):
    """Same global batch (8): one process of micro-batches of 8, two gloo processes of
    accumulated micro-batches of 2; per-step losses agree within 1e-5."""
    student, teacher, data = tiny_run(folder)
    train(student, teacher, data, Recipe(**{**TINY_RECIPE, "micro_batch": 8}), tmp_path / "one", {}, progress=False)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + [str(REPO / "tests" / "finetune_worker.py"), str(folder), str(tmp_path / "two"), "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-5, (one, two)


# -- data ------------------------------------------------------------------------------------------


def test_posterize_at_full_magnitude_gives_black_instead_of_a_pillow_error(folder):
    img = Image.open(next(Path(folder).rglob("*.JPEG"))).convert("RGB")
    assert _posterize(img, 0).getextrema() == ((0, 0),) * 3
    assert _posterize(img, 4).getextrema() != ((0, 0),) * 3
    from timm.data import auto_augment

    transform = train_transform(tiny_vit(), True, "rand-m9-mstd0.5-inc1")
    ops = [t for t in transform.transforms if isinstance(t, auto_augment.RandAugment)][0].ops
    poster = [op for op in ops if op.name == "PosterizeIncreasing"][0]
    poster.prob, poster.magnitude_std, poster.magnitude = 1.0, 0, 10  # 4 - int(10 / 10 * 4) = 0 bits
    assert poster(img).getextrema() == ((0, 0),) * 3


def test_seeded_images_are_the_same_in_any_order_and_leave_global_rngs_alone(folder):
    data = SeededImages(list_train_images(folder, need_labels=False), train_transform(tiny_vit()), seed=5)
    state = torch.get_rng_state()
    a = data[(0, 1)]
    _ = data[(1, 1)], data[(0, 2)]
    assert torch.equal(a[0], data[(0, 1)][0]) and not torch.equal(a[0], data[(1, 1)][0])
    assert torch.equal(state, torch.get_rng_state())


def _folder(root: Path, names: list[str], wnid: str | None = "n01440764") -> Path:
    d = root / wnid if wnid else root
    d.mkdir(parents=True)
    for i, name in enumerate(names):
        Image.new("RGB", (40, 30), (i * 40, 90, 200 - i * 30)).save(d / name)
    return root


def test_training_folder_checks(tmp_path):
    ev = _folder(tmp_path / "eval", ["x.JPEG", "y.JPEG"])
    with pytest.raises(BenchError, match="is the evaluation folder"):
        check_disjoint(ev, ev)
    with pytest.raises(BenchError, match="shares 1 images with the evaluation folder"):
        check_disjoint(_folder(tmp_path / "near", ["y.JPEG", "z.JPEG"]), ev)
    with pytest.raises(BenchError, match="contain one another"):
        check_disjoint(ev / "n01440764", ev)
    check_disjoint(_folder(tmp_path / "fine", ["a.JPEG"]), ev)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchError, match="holds no images"):
        list_train_images(tmp_path / "empty", need_labels=False)
    flat = _folder(tmp_path / "flat", ["a.JPEG", "b.png"], wnid=None)
    assert list_train_images(flat, need_labels=False).labels == [-1, -1]
    with pytest.raises(BenchError, match="loss needs labels but a.JPEG .* use loss=kd"):
        list_train_images(flat, need_labels=True)


# -- the command, its checkpoints and its records ----------------------------------------------------

CLI_FAST = [
    f"model.checkpoint={RANDOM_WEIGHTS}",  # a real file (of random weights): fine-tuning refuses random_init
    "model.img_size=64",
    "budget.macs_ratio=null",
    "finetune=quick",
    "finetune.batch_size=4",
    "finetune.micro_batch=2",
    "finetune.images=8",
    "finetune.num_workers=0",
    *[o for o in FAST if not o.startswith("model.")],
    "bench.latency.enabled=false",
    "bench.scaling.enabled=false",
    "bench.spectral.enabled=false",
]


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftval")
    image_folder(root / "tmp", n_classes=2, per_class=2)
    for f in (root / "tmp").rglob("*.JPEG"):  # same classes, other file names than the training folder
        (root / "val" / f.parent.name).mkdir(parents=True, exist_ok=True)
        f.rename(root / "val" / f.parent.name / f"val_{f.name}")
    return root / "val"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.train_root={val}"], "is the evaluation folder data.root: never train on eval images"),
        (["data.train_root={empty}"], "holds no images"),
        (["data.train_root={flat}", "loss=ce_kd"], "loss needs labels but"),
        (["data.train_root={flat}", "loss=ce"], "loss needs labels but"),
        (["data.train_root={train}", "method=none", "train=reducer"], "has no reducer parameters"),
        (
            ["data.train_root={train}", "finetune.images=null", "finetune.epochs=0"],
            r"^finetune.epochs must be a number in \(0, inf\] or null, got 0$",
        ),
        (["data.train_root={train}", "finetune.lr=abc"], r"^finetune.lr must be a number in \(0, inf\], got 'abc'$"),
        (["data.train_root={train}", "finetune.batch_size=0"], r"^finetune.batch_size must be an integer >= 1, got 0$"),
        (
            ["data.train_root={train}", "finetune.images=null", "finetune.epochs=0.01"],
            r"^finetune.epochs=0.01 of 8 images is no image",
        ),
        (  # finetune.yaml is a plain tree: the evaluation's settings are typed before training (was a traceback)
            ["data.train_root={train}", "budget=0.5"],
            r"^budget is a section of settings, not a value; set one of budget.macs_ratio, budget.tolerance$",
        ),
        (["data.train_root={train}", "bench.latency.iters=abc"], r"^bench.latency.iters must be an integer >= 1"),
        # the evaluation's value checks too, before training (seed=-1 trained, then the evaluation refused it)
        (["data.train_root={train}", "seed=-1"], r"^seed must be an integer >= 0, got -1$"),
        (["data.train_root={train}", "bench.latency.iters=0"], r"^bench.latency.iters must be an integer >= 1, got 0$"),
        (
            ["data.train_root={train}", "resume=maybe"],
            r"^resume must be true or false, got 'maybe'$",
        ),  # trained as true
        (
            ["data.train_root={train}", "data.train_limit=0"],
            r"^data.train_limit must be an integer >= 1 or null, got 0$",
        ),
    ],
)
def test_bad_input_is_refused_before_training(overrides, message, val, folder, tmp_path):
    (tmp_path / "empty").mkdir()
    paths = {"val": val, "empty": tmp_path / "empty", "train": folder}
    paths["flat"] = _folder(tmp_path / "flat", ["a.JPEG"], wnid=None)
    cfg = compose_finetune(  # the case's own overrides last: they win over the fast defaults
        [f"data.root={val}", f"checkpoint_dir={tmp_path}/ck", *CLI_FAST] + [o.format(**paths) for o in overrides]
    )
    cfg.results_dir = str(tmp_path / "results")
    with pytest.raises(BenchError, match=message):
        run_finetune(cfg)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "results").exists()


def test_bad_input_on_the_command_line_is_one_line_and_exit_2(val, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "bench.finetune", "method=fatr", f"data.root={val}", f"data.train_root={val}"]
        + [f"checkpoint_dir={tmp_path}/ck", f"hydra.sweep.dir={tmp_path}/sweep", "progress=false"],
        cwd=REPO,
        env={**os.environ, "FATR_RESULTS_DIR": str(tmp_path / "results")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is the evaluation folder data.root: never train on eval images" in errors[0]
    assert not (tmp_path / "ck").exists() and not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("finetune=nope", "error: finetune=nope: no such finetune; choose one of calibrate, paper, quick"),
        (
            "model=deit_huge",
            "error: model=deit_huge: no such model; choose one of deit_base, deit_small, deit_tiny, vit_large",
        ),
    ],
)
def test_a_config_group_option_that_is_not_there_is_one_line(override, message, tmp_path):
    """As in bench.run: one line naming the group's options, exit 2, instead of Hydra's report."""
    out = run_cli(["method=tome", override], tmp_path, timeout=300, module="bench.finetune")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert [line for line in out.stderr.splitlines() if line.strip()] == [message]


@pytest.mark.parametrize(
    "override, message",
    [
        ("budget=0.5", "error: budget is a section of settings, not a value; set one of budget.macs_ratio, "),
        ("seed=-1", "error: seed must be an integer >= 0, got -1"),
    ],
)
def test_a_bad_evaluation_setting_of_a_sweep_is_one_line_before_any_job(override, message, tmp_path):
    """Shared by every method of the sweep, so said once (it was one failed job per method),
    before the training folder is even looked for."""
    out = run_cli(["method=tome,evit", override], tmp_path, timeout=300, module="bench.finetune")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), out.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("budget.macs_ratio=0.05", "error: budget macs_ratio=0.05 is impossible for method tome"),
        ("method.reducer.r=4", "error: method.reducer.r=4 was set explicitly, but budget.macs_ratio=0.65"),
    ],
)
def test_a_reducer_one_run_cannot_use_is_one_line_before_training(override, message, tmp_path):
    """One method at one budget: its reducer is set up on the weightless model before the job,
    as bench.run does, so nothing is launched and the training folder is never looked for."""
    out = run_cli(["method=tome", override], tmp_path, timeout=300, module="bench.finetune")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), out.stderr
    assert "Launching" not in out.stdout


def compose_finetune(overrides: list[str]):
    return compose(overrides, "finetune")


def test_finetune_command_end_to_end(val, folder, tmp_path):
    """Train, save, evaluate, record; a second plain run refuses to overwrite, resume=true has
    nothing left to do; bench.run evaluates the saved checkpoint."""
    args = [f"data.root={val}", f"data.train_root={folder}", f"checkpoint_dir={tmp_path}/ck", *CLI_FAST]
    env = {**os.environ, "FATR_RESULTS_DIR": str(tmp_path / "results")}

    def cli(*extra):
        return subprocess.run(
            [sys.executable, "-m", "bench.finetune", "method=evit", "loss=kd", *args, *extra]
            + [f"hydra.sweep.dir={tmp_path}/sweep"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    out = cli()
    assert out.returncode == 0, out.stderr[-3000:]
    records = read_records(tmp_path / "results")
    assert [(r["method"], "finetune" in r) for r in records] == [("none", False), ("evit", False), ("evit", True)]
    tuned = records[-1]
    prov = tuned["finetune"]
    assert prov["images_seen"] == 8 and prov["steps"] == 2 and prov["trained"] == "all" and prov["loss"] == "kd"
    assert prov["train_root"] == str(folder) and prov["weights"] == "last" and prov["recipe_name"] == "quick"
    assert tuned["config"]["finetuned"]["recipe"]["lr"] == 1e-5
    assert tuned["metrics"]["num_images"] == 4 and "top1" in tuned["metrics"]
    ckpt = Path(prov["checkpoint"])
    assert ckpt.name == "final.pt" and not (ckpt.parent / LAST).exists()
    assert [r["step"] for r in read_metrics(ckpt.parent / METRICS)] == [1, 2]
    assert list((tmp_path / "results" / "finetune").glob("evit-*.png"))
    board = (tmp_path / "results" / "leaderboard.md").read_text()
    assert "## Fine-tuned" in board and "quick, loss kd, train all, 8 images seen of train (recipe " in board

    cfg = compose_finetune(["method=evit", "loss=kd", *args, f"results_dir={tmp_path}/results"])
    with pytest.raises(BenchError, match="exists \\(this configuration is trained\\): evaluate it with resume=true"):
        run_finetune(cfg)
    cfg.resume = True
    assert run_finetune(cfg) is None  # trained and recorded already: nothing to do
    assert len(read_records(tmp_path / "results")) == 3

    from bench_utils import compose as compose_run

    from bench.job import run_job

    evaluate = [f"model.checkpoint={ckpt}", f"data.root={val}", "model.img_size=64", "budget.macs_ratio=null"]
    evaluate += [o for o in FAST if not o.startswith("model.")] + [f"results_dir={tmp_path}/results2"]
    evaluate += ["bench.latency.enabled=false", "bench.scaling.enabled=false", "bench.spectral.enabled=false"]
    import bench.measure.spectral

    bench.measure.spectral._REFERENCE.clear()
    spectral = ["bench.spectral.enabled=true", "bench.spectral.images=2"]
    record = run_job(compose_run(["method=evit", *evaluate, *spectral]))
    assert record["finetune"]["images_seen"] == 8 and record["config"]["model"]["checkpoint"] == str(RANDOM_WEIGHTS)
    assert record["metrics"]["top1"] == tuned["metrics"]["top1"]
    bench.measure.spectral._REFERENCE.clear()
    base_model = [f"model.checkpoint={RANDOM_WEIGHTS}"]
    shelf = run_job(compose_run(["method=evit", *evaluate[1:], *base_model, *spectral]))  # off the shelf
    ref = [b["hf_energy_unreduced"] for b in shelf["metrics"]["spectral_blocks"]]
    assert [b["hf_energy_unreduced"] for b in record["metrics"]["spectral_blocks"]] == ref  # the base model's
    base = read_records(tmp_path / "results2")[0]
    same = [{k: v for k, v in r["config"].items() if k != "bench"} for r in (base, records[0])]
    assert base["method"] == "none" and same[0] == same[1]  # the plain unreduced reference, not a fine-tuned one
    with pytest.raises(BenchError, match="was fine-tuned with method evit"):
        run_job(compose_run(["method=tome", *evaluate]))


def test_loss_curve_in_the_record_is_bin_means():
    rows = [{"images_seen": 4 * i, "loss": float(i)} for i in range(1, 1001)]
    curve = loss_curve(rows)
    assert len(curve["loss"]) == 200 and curve["images_seen"][-1] == 4000
    assert curve["loss"][0] == 3.0 and curve["loss"][-1] == 998.0  # mean of steps 1..5, 996..1000
    assert loss_curve(rows[:3]) == {"images_seen": [4, 8, 12], "loss": [1.0, 2.0, 3.0]}


def test_finetuned_checkpoint_and_reducer_file_round_trip(tmp_path):
    model = tiny_vit()
    apply_reducer(model, reducer_for("fatr"))
    with torch.no_grad():
        model.token_reducer.omega1.normal_()
        model.head.bias.add_(1.0)
    meta = {"model": {}, "method": {}, "budget": {}, "identity": {"a": 1}, "provenance": {"steps": 3}}
    save_finetuned(tmp_path / "final.pt", model, meta)
    save_reducer_state(tmp_path / "reducer.pt", model, dict(model.token_reducer.hparams))
    tuned = read_finetuned(tmp_path / "final.pt")
    assert tuned is not None and set(tuned.reducer) == {k for k, _ in model.token_reducer.state_dict().items()}
    assert read_finetuned(tmp_path / "reducer.pt") is None  # not a whole model
    x = FixedImages().x[:2]
    with torch.no_grad():
        want = model(x)
        fresh = tiny_vit()
        apply_reducer(fresh, reducer_for("fatr"))
        tuned.load_into(fresh)
        assert torch.equal(fresh(x), want)
        # FATR's omega_path reads the reducer file (ω only: the weights here are the originals)
        remove_reducer(model)
        model.head.bias.sub_(1.0)
        plain = tiny_vit()
        omega = str(tmp_path / "reducer.pt")
        apply_reducer(plain, build_reducer("fatr", blocks=[1, 3], dc_grid=[2, 1], keep_rate=0.5, omega_path=omega))
        apply_reducer(model, reducer_for("fatr"))
        model.token_reducer.load_state_dict(tuned.reducer)
        assert torch.allclose(plain(x), model(x))
    with pytest.warns(UserWarning, match="keep_rate"):  # fitted for another keep rate: said so
        apply_reducer(tiny_vit(), build_reducer("fatr", blocks=[1, 3], dc_grid=[2, 1], keep_rate=0.6, omega_path=omega))


# -- the leaderboard ---------------------------------------------------------------------------------


def _record(method: str, top1: float, tuned: bool, budget: float | None = 0.65, recipe: str = "r1") -> dict:
    config = {
        "method": {"name": method},
        "model": {"name": "deit_tiny_patch16_224"},
        "data": {"root": "/data/val"},
        "budget": {"macs_ratio": budget},
        "bench": {"accuracy": True},
        "device": "cpu",
    }
    record = {
        "method": method,
        "model": "deit_tiny_patch16_224",
        "data_root": "/data/val",
        "num_images": 1000,
        "budget": {"macs_ratio_target": budget},
        "metrics": {"top1": top1, "agreement": 90.0},
        "device": "CPU test",
        "git_commit": "abc",
        "timestamp": "2025-01-01T00:00:00",
        "variant": "",
    }
    if tuned:
        config["finetuned"] = {"recipe": recipe}
        record["finetune"] = {
            "recipe_name": "quick",
            "recipe_hash": recipe,
            "loss": "kd",
            "trained": "all",
            "images_seen": 10000,
            "steps": 313,
            "img_per_s": 20.0,
            "weights": "last",
            "device": "CPU test",
            "train_root": "/data/calib",
            "loss_curve": {"images_seen": [32, 64], "loss": [0.5, 0.4]},
        }
    record["config"] = config
    from bench.store import config_hash

    record["config_hash"] = config_hash(config)
    return record


def test_leaderboard_fine_tuned_section(tmp_path):
    for r in [
        _record("none", 72.0, False, budget=None),
        _record("fatr", 70.0, False),
        _record("tome", 69.5, False),
        _record("none", 72.5, True, budget=None),
        _record("fatr", 71.25, True),
        _record("tome", 71.0, True, recipe="r2"),  # another recipe: no control of its own
    ]:
        append_record(tmp_path, r)
    paths = write_leaderboard(tmp_path)
    md = (tmp_path / "leaderboard.md").read_text()
    main, tuned = md.split("## Fine-tuned")
    assert "71.25" not in main and "72.50" not in main  # fine-tuned runs stay out of the main table
    rows = {line.split(" | ")[0].strip("| "): line for line in tuned.splitlines() if line.startswith("| ")}
    # synthetic records carry no per-image outcomes: the Δs are shown, marked unpaired
    expect = "| fatr | 0.65 | 71.25 ± 1.43 | -1.25 (unpaired) | – | +1.25 (unpaired) | – | 90.00 | 313 | 20.0 | last |"
    assert rows["fatr"] == expect
    assert "| none | – | 72.50 ± 1.41 | – | – | +0.50 (unpaired) | – |" in rows["none"]
    assert "| tome | 0.65 | 71.00 ± 1.43 | – | – | +1.50 (unpaired) | – |" in rows["tome"]
    assert tuned.count("### deit_tiny_patch16_224 on val (1000 images)") == 2
    assert tmp_path / "finetune_loss.png" in paths


def test_leaderboard_fine_tuned_section_pairs_over_images(tmp_path):
    """With per-image outcomes the Δs are paired: identical outcomes give 0 [0, 0] and p = 1; a
    method wrong on 20 of 100 images the control gets right gives -20 and McNemar's exact p."""
    import numpy as np

    from bench.measure.outcomes import Outcomes, save_outcomes

    ids = np.array([f"n01440764/{i}.JPEG" for i in range(100)])
    label = np.zeros(100, dtype=np.int16)

    def with_outcomes(record: dict, correct: np.ndarray) -> dict:
        o = Outcomes(ids, label, label, correct, np.ones(100, bool), correct)
        record["num_images"] = 100
        record["metrics"]["top1"] = 100.0 * correct.mean()
        record["metrics"]["outcomes_file"] = save_outcomes(tmp_path, record["method"], o)
        return record

    right = np.ones(100, bool)
    wrong20 = right.copy()
    wrong20[:20] = False
    for r in [
        with_outcomes(_record("none", 0, True, budget=None), right),
        with_outcomes(_record("fatr", 0, False), wrong20),
        with_outcomes(_record("fatr", 0, True), wrong20),
    ]:
        append_record(tmp_path, r)
    write_leaderboard(tmp_path)
    tuned = (tmp_path / "leaderboard.md").read_text().split("## Fine-tuned")[1]
    row = next(line for line in tuned.splitlines() if line.startswith("| fatr |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3].startswith("-20.00 [") and "(tie)" not in cells[3]
    assert cells[4] == f"{2 * 0.5**20:.3g}"  # exact McNemar: 0 vs 20 discordant images
    assert cells[5:7] == ["+0.00 [+0.00, +0.00] (tie)", "1"]
    assert "paired over the same images" in tuned


def test_train_throughput_times_each_method_and_refuses_bad_settings(folder, tmp_path, capsys):
    from bench.train_throughput import main

    out = tmp_path / "tt.jsonl"
    args = [f"data.train_root={folder}", "device=cpu", "steps=1", "warmup=0", f"out={out}", *CLI_FAST]
    assert main(["method=none,tome", *args]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["none", "tome"]
    assert all(r["img_per_s"] > 0 and r["steps"] == 1 and r["batch_size"] == 4 for r in rows)
    assert "the unreduced model's throughput" in capsys.readouterr().out
    assert main(["method=tome", *args, "steps=0"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    assert main(["method=tome", "data.train_root=/no/such/folder", "device=cpu"]) == 2
    assert "not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["steps=abc"], "steps and warmup must be integers"),
        (["--x"], "--x: this tool takes key=value overrides, not flags"),
        (["--batch=0"], "--batch=0: this tool takes key=value overrides, not flags"),
        (["step s=1"], "LexerNoViableAltException"),  # a malformed override: Hydra's own words
        (["finetune=nope"], "finetune=nope: no such finetune; choose one of calibrate, paper, quick"),
        (["method=nope"], "method=nope: no such method; choose one of ats,"),
    ],
)
def test_train_throughput_bad_arguments_are_one_line(args, message, capsys):
    from bench.train_throughput import main

    assert main(["device=cpu", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_train_throughput_help_prints_its_usage(capsys):
    from bench.train_throughput import main

    assert main(["--help"]) == 0
    assert "python -m bench.train_throughput method=" in capsys.readouterr().out


BAD_SETTINGS = [
    ("images", 0, "an integer >= 1 or null"),
    ("images", 2.5, "an integer >= 1 or null"),
    ("epochs", -1, "a number in (0, inf] or null"),
    ("epochs", "3", "a number in (0, inf] or null"),
    ("batch_size", 0, "an integer >= 1"),
    ("micro_batch", True, "an integer >= 1"),
    ("lr", 0, "a number in (0, inf]"),
    ("lr", float("nan"), "a number in (0, inf]"),
    ("weight_decay", -1e-5, "a number in [0, inf]"),
    ("min_lr", "x", "a number in [0, inf]"),
    ("warmup_epochs", -1, "a number in [0, inf]"),
    ("drop_path", 1.0, "a number in [0, 1)"),
    ("ema_decay", 1.0, "a number in (0, 1) or null"),
    ("eval_ema", "yes", "true or false"),
    ("kd_weight", 1.5, "a number in [0, 1]"),
    ("temperature", 0, "a number in (0, inf]"),
    ("label_smoothing", 1, "a number in [0, 1)"),
    ("clip_grad", 0, "a number in (0, inf] or null"),
    ("amp", 1, "true or false"),
    ("augment", None, "true or false"),
    ("re_prob", -0.1, "a number in [0, 1]"),
    ("checkpoint_every", 0, "an integer >= 1"),
    ("num_workers", -1, "an integer >= 0"),
]


@pytest.mark.parametrize("recipe", ["paper", "quick", "calibrate"])
def test_every_shipped_recipe_passes_the_settings_check(recipe):
    from bench.validate import FINETUNE_SETTINGS, check_finetune_settings

    cfg = compose_finetune([f"finetune={recipe}"])
    check_finetune_settings(cfg.finetune)
    checked = {key.removeprefix("finetune.") for key in FINETUNE_SETTINGS}
    assert checked <= set(cfg.finetune), "a checked key no recipe has: stale FINETUNE_SETTINGS"
    assert {key for key, _, _ in BAD_SETTINGS} == checked  # every checked key has a bad value below


@pytest.mark.parametrize(("key", "value", "what"), BAD_SETTINGS)
def test_a_recipe_value_the_job_cannot_use_is_one_line_naming_it(key, value, what):
    from bench.validate import check_finetune_settings

    cfg = OmegaConf.to_container(compose_finetune([]).finetune)
    with pytest.raises(BenchError) as e:
        check_finetune_settings({**cfg, key: value})
    assert str(e.value) == f"finetune.{key} must be {what}, got {value!r}"


def test_a_recipe_with_neither_epochs_nor_images_is_refused():
    from bench.validate import check_finetune_settings

    cfg = OmegaConf.to_container(compose_finetune([]).finetune)
    with pytest.raises(BenchError, match="finetune.epochs and finetune.images are both null"):
        check_finetune_settings({**cfg, "epochs": None, "images": None})
