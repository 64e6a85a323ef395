"""Token maps (``python -m bench.visualize``): every method's source map painted as a partition
of the patch grid, an honest panel where there is none, and bad input as one line.

Methods are built from their Hydra configs (``method_names()``), so a new method is drawn here
as soon as its yaml exists. The tiny ViT has 12 blocks so that every default schedule fits.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cache

import numpy as np
import pytest
import torch
from bench_utils import RANDOM_WEIGHTS
from conftest import build_reducer, method_names, tiny_vit
from helpers import run_capturing
from PIL import Image

from bench.report.token_maps import (
    DC,
    FATR_DC_SLOTS,
    FUSED,
    KEPT,
    MERGED,
    NO_SOURCE_MAP,
    PRUNED,
    MethodMaps,
    boundary_segments,
    capture_token_maps,
    denormalize,
    draw_token_maps,
    patch_owners,
    stage_block,
)
from bench.visualize import main, split_methods
from methods import TokenReducer
from methods.tokens import keep_tokens, prefix_index

WITHOUT_SOURCE_MAP: set[str] = set()
"""Methods whose reducer does not keep ``TokenState.source``: they draw a 'no source map' panel.
None today; a reducer that builds its states without the map belongs here until it keeps it."""

SOFT_SOURCE = {"dct"}
"""Methods whose tokens mix patches (a patch shared by several tokens): painted by largest share."""

GRID = (8, 8)
STAGES = [3, 6, None]


IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@cache
def _base_vit() -> torch.nn.Module:
    return tiny_vit(depth=12)


def vit12() -> torch.nn.Module:
    """A fresh 12-block tiny ViT (a copy: patching changes the model)."""
    return copy.deepcopy(_base_vit())


@dataclass(frozen=True)
class Drawn:
    """One method's states at every reduction (and after the last block), and its token maps."""

    states: list
    maps: list
    problem: str | None


@cache
def drawn(name: str) -> Drawn:
    """Each method run once for the whole module: the tests below share it."""
    _, steps, ctx = run_capturing(vit12(), build_reducer(name), IMAGES)
    maps, problem = capture_token_maps(vit12(), build_reducer(name), IMAGES, STAGES)
    return Drawn([after for _, _, after in steps] + [ctx.state], maps, problem)


@pytest.fixture(scope="module")
def images():
    return IMAGES


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pictures(images):
    return denormalize(images, (0.5,) * 3, (0.25,) * 3)


def test_the_dc_key_is_fatrs():
    """The report room may not import fatr: its copy of the key must stay FATR's."""
    from fatr.reducer import DC_SLOTS

    assert FATR_DC_SLOTS == DC_SLOTS


def _check_partition(source: torch.Tensor, num_prefix: int, soft_allowed: bool) -> None:
    """One image's source map ``(N, P)``: every patch has exactly one owner or is pruned."""
    owner, soft = patch_owners(source, num_prefix)
    weights = source[num_prefix:]
    covered = weights.sum(0) > 1e-6
    assert owner.shape == (source.shape[1],)
    assert torch.equal(owner == PRUNED, ~covered), "pruned exactly where no token covers the patch"
    assert ((owner >= num_prefix) & (owner < source.shape[0]) | (owner == PRUNED)).all()
    if soft and not soft_allowed:
        raise AssertionError("a hard method's source map shares a patch between tokens")
    if not soft:  # hard maps: the owner is the one token covering the patch
        holders = (weights > 1e-6).sum(0)
        assert (holders[covered] == 1).all()
        rows = owner[covered] - num_prefix
        assert (weights[rows, covered.nonzero()[:, 0]] > 0).all()


@pytest.mark.parametrize("name", method_names())
def test_every_method_paints_a_partition_of_the_patch_grid(name, images, tmp_path):
    run = drawn(name)
    if all(s.source is not None for s in run.states):
        for state in run.states:
            for i in range(len(images)):
                _check_partition(state.source[i], state.num_prefix, name in SOFT_SOURCE)
    if run.problem:
        assert run.problem.startswith(NO_SOURCE_MAP) and run.maps == []
    else:
        assert len(run.maps) == len(images) and all(len(row) == len(STAGES) for row in run.maps)
        for row in run.maps:
            for tm in row:
                assert tm.owner.shape == GRID
                owners = set(np.unique(tm.owner).tolist()) - {PRUNED}
                assert owners == set(tm.kinds), "every painted token has a kind, every kind a region"
                assert set(tm.kinds.values()) <= {KEPT, MERGED, DC, FUSED}
    panel = MethodMaps(name, name, [row[-1:] for row in run.maps[:1]], run.problem)
    out = draw_token_maps(_pictures(images[:1]), ["a"], [panel], tmp_path / "m.png", name)
    assert out.is_file() and out.stat().st_size > 0


def test_which_methods_have_no_source_map():
    """Says which methods draw a 'no source map' panel (``WITHOUT_SOURCE_MAP``)."""
    missing = {name for name in method_names() if drawn(name).problem}
    assert missing == WITHOUT_SOURCE_MAP, (
        f"methods without a source map (drawn as '{NO_SOURCE_MAP}' panels): {sorted(missing)}; "
        "keep TokenState.source in their reducer, or list them in WITHOUT_SOURCE_MAP"
    )


def test_what_each_method_adds_is_marked():
    """FATR's DC tokens sit right after the prefix; EViT's fused token is marked, TopK prunes."""
    last = {name: drawn(name).maps[0][-1] for name in ("fatr", "evit", "topk", "tome", "none")}
    fatr = last["fatr"]
    dc = {t for t, k in fatr.kinds.items() if k == DC}
    assert dc and min(dc) == 1, "the DC tokens follow the class token"
    assert set(fatr.kinds.values()) == {DC, KEPT}, "FATR: DC tokens and high-frequency patches"
    assert FUSED in last["evit"].kinds.values() and MERGED not in last["evit"].kinds.values()
    assert set(last["topk"].kinds.values()) == {KEPT} and last["topk"].pruned > 0
    assert MERGED in last["tome"].kinds.values() and last["tome"].pruned == 0
    assert set(last["none"].kinds.values()) == {KEPT} and last["none"].tokens == 64


def test_stages_read_the_tokens_after_their_block(images):
    """Before a method's first reduction every patch is its own token; None is the last block's input."""
    maps, _ = capture_token_maps(vit12(), build_reducer("evit"), images[:1], [0, 3, 9, None])
    before, first, last, default = maps[0]
    assert before.tokens == 64 and set(before.kinds.values()) == {KEPT}
    assert first.tokens < 64 and last.tokens < first.tokens
    assert np.array_equal(last.owner, default.owner) and stage_block(None, 12) == 10


class _DropsSource(TokenReducer):
    """Keeps every other patch and forgets the source map (what an honest panel must show).

    Args:
        stale: keep the old map instead, out of step with the tokens.
    """

    def __init__(self, stale: bool = False) -> None:
        super().__init__(stale=stale)
        self.stale = stale

    def reduces_at(self, block: int) -> bool:
        return block == 2

    def reduce(self, state, block):
        idx = torch.cat([prefix_index(state), torch.arange(1, state.num_tokens, 2).expand(state.x.shape[0], -1)], 1)
        out = keep_tokens(state, idx)
        return out.replace(source=state.source if self.stale else None)


@pytest.mark.parametrize("stale", [False, True])
def test_a_reducer_without_a_usable_source_map_gets_an_honest_panel(stale, images, tmp_path):
    maps, problem = capture_token_maps(vit12(), _DropsSource(stale), images, [None])
    assert maps == [] and problem.startswith(NO_SOURCE_MAP)
    out = draw_token_maps(_pictures(images), ["a", "b"], [MethodMaps("x", "x", [], problem)], tmp_path / "x.png", "x")
    assert out.is_file()


def test_outlines_separate_tokens_but_not_pruned_neighbours():
    owner = np.array([[1, 1, PRUNED], [2, PRUNED, PRUNED]])
    segments = boundary_segments(owner, 1.0, 1.0)
    # 1|PRUNED (row 0), 1/2 (col 0), 1/PRUNED (col 1), 2|PRUNED (row 1): four edges
    assert len(segments) == 4


def test_methods_split_on_commas_and_default_to_three():
    assert split_methods(["method=fatr,tome", "visualize.images=2"]) == (["fatr", "tome"], ["visualize.images=2"])
    assert split_methods(["method.reducer.r=8"]) == (["fatr", "tome", "evit"], ["method.reducer.r=8"])


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_missing_image_file_is_one_line(capsys, tmp_path):
    code = main(["method=tome", f"visualize.paths=[{tmp_path}/nope.png]", f"visualize.out={tmp_path}/t.png"])
    assert code == 2 and "does not exist" in _one_error(capsys)


def test_an_unreadable_image_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not an image")
    code = main(["method=tome", f"visualize.paths=[{bad}]", f"visualize.out={tmp_path}/t.png"])
    assert code == 2 and f"cannot read image {bad}" in _one_error(capsys)


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_no_images_is_one_line(capsys, tmp_path, value):
    code = main(["method=tome", f"visualize.images={value}", f"visualize.out={tmp_path}/t.png"])
    assert code == 2 and "visualize.images must be an integer >= 1" in _one_error(capsys)


def test_an_unknown_method_is_one_line(capsys, tmp_path):
    code = main(["method=nope", f"visualize.out={tmp_path}/t.png"])
    assert code == 2 and "method=nope: no such method; choose one of " in _one_error(capsys)


def test_a_sweep_of_anything_but_methods_is_one_line(capsys, tmp_path):
    code = main(["method=tome", "budget.macs_ratio=0.5,0.65", f"visualize.out={tmp_path}/t.png"])
    assert code == 2 and "only method= takes a comma-separated list" in _one_error(capsys)


@pytest.mark.parametrize("value", ["2", "0", "abc"])
def test_a_budget_out_of_range_is_one_line_before_any_method_is_drawn(capsys, tmp_path, value):
    code = main(["method=tome,evit", f"budget.macs_ratio={value}", f"visualize.out={tmp_path}/t.png"])
    assert code == 2 and "budget.macs_ratio must be a number in (0, 1] or null, got" in _one_error(capsys)
    assert not (tmp_path / "t.png").exists()


def test_when_every_method_fails_the_last_figure_is_kept(capsys, tmp_path):
    """A figure of input images and "not drawn" panels only would replace the one an earlier
    call drew; with nothing to draw, the old one stays, each method's error is said, status 2."""
    (a,) = _user_images(tmp_path)[:1]
    out = tmp_path / "maps.png"
    out.write_bytes(b"the earlier figure")
    args = [f"model.checkpoint={RANDOM_WEIGHTS}", "progress=false", f"visualize.out={out}", f"visualize.paths=[{a}]"]
    code = main(["method=tome", "method.reducer.r=-3", *args])
    assert code == 2 and out.read_bytes() == b"the earlier figure"
    assert _one_error(capsys) == "error: method tome: cannot build method 'tome': ToMe r must be >= 0, got -3"


def _user_images(folder):
    paths = []
    for i, mode in enumerate(("RGB", "L")):  # any image files, any mode; no labels
        img = Image.effect_mandelbrot((120, 90), (-2, -1.2, 0.8, 1.2 + 0.2 * i), 50).convert(mode)
        paths.append(folder / f"own_{i}.png")
        img.save(paths[-1])
    return paths


def test_a_users_own_images_draw_and_a_failing_method_says_why(capsys, tmp_path):
    """Two files of one's own, one method drawn per block, one that cannot meet the budget: the
    figure is written with a panel saying why, one error line for it, and status 2."""
    a, b = _user_images(tmp_path)
    out = tmp_path / "maps.png"
    args = [f"model.checkpoint={RANDOM_WEIGHTS}", "progress=false", f"visualize.out={out}"]
    code = main(["method=none,tome", f"visualize.paths=[{a},{b}]", "visualize.blocks=[3,10]", *args])
    assert code == 0 and out.is_file(), capsys.readouterr().err
    assert f"token maps: {out}" in capsys.readouterr().out
    code = main(["method=none,tome", f"visualize.paths=[{a}]", "budget.macs_ratio=0.01", *args])
    assert code == 2 and out.is_file()
    assert _one_error(capsys).startswith("error: method tome: budget macs_ratio=0.01 is impossible")


def test_long_file_names_do_not_run_into_the_next_rows_label(images, tmp_path, monkeypatch):
    """A file name can be longer than a panel is high (ImageNet's ran into the next row's label
    in a five-column figure): each row's label is broken into lines that fit beside its panel,
    so no two rows' labels overlap."""
    import bench.report.token_maps as token_maps

    assert token_maps.fit_label("ILSVRC2012_val_00023559\ntench") == "ILSVRC2012_val_\n00023559\ntench"
    assert token_maps.fit_label("abcdefghijklmnopqrstu", width=8) == "abcdefgh\nijklmnop\nqrstu"
    extents = []

    def measured_save(fig, out, *args, **kwargs):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        extents.extend(ax.yaxis.label.get_window_extent(renderer) for ax in fig.axes if ax.get_ylabel())
        return save(fig, out, *args, **kwargs)

    save = token_maps.save
    monkeypatch.setattr(token_maps, "save", measured_save)
    names = [f"ILSVRC2012_val_0002355{i}_taken_from_a_longer_path\ntench" for i in range(len(images))]
    panel = MethodMaps("x", "x", [], f"{NO_SOURCE_MAP}: test")
    draw_token_maps(_pictures(images), names, [panel], tmp_path / "x.png", "x", stages=(3, None))
    assert len(extents) == 2 * len(images)
    for upper, lower in zip(extents, extents[1:], strict=False):
        assert lower.y1 <= upper.y0, "a row label runs into the next one"
