"""Token maps: what each reducer did to the image, painted from the source map the patch keeps.

Accuracy and MACs say how much a method loses; a token map says *where*: which patches each
output token stands for. :func:`capture_token_maps` runs a patched model with
``apply_reducer(..., trace_source=True)`` and taps the token state after every reduction
(``ReductionContext.observe``, as the spectral pass does); :func:`token_map` reads one image's
source map ``(tokens, patches)`` into an owner per patch; :func:`draw_token_maps` paints them:

- a patch that is its own token (kept as it was: a pruning method's survivor, FATR's
  high-frequency token) stays as the image shows it, outlined;
- the patches of a merged token (ToMe, pooling, clustering...) share one tint and one outline;
- FATR's DC tokens (``state.extra["fatr_dc_slots"]`` slots right after the prefix tokens) and
  EViT's fused token (its tokens that are no original patch) are tinted *and* hatched;
- a patch no token covers any more (pruned) is greyed.

Every patch is painted by exactly one token or greyed. A reducer that mixes tokens (DCT) leaves
a soft map, a patch shared by several tokens: it is painted with its largest share, and the
panel says so. A reducer that does not keep the source map gets a panel saying that, never a
guess.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from bench.report.style import figure, method_color, save
from methods import TokenReducer, apply_reducer, reduction_context
from methods.base import TokenState
from methods.evit import EViT

PRUNED = -1
"""Owner of a patch that no output token covers."""
FATR_DC_SLOTS = "fatr_dc_slots"
"""``fatr.reducer.DC_SLOTS``: how many DC tokens follow the prefix tokens. The report room may not
import ``fatr``; ``tests/test_visualize.py`` holds the two equal."""
KEPT, MERGED, DC, FUSED = "kept", "merged", "dc", "fused"
SPECIAL = (DC, FUSED)
NO_SOURCE_MAP = "no source map"
_EPS = 1e-6
_TINTS = [
    "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
    "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3",
    "#808000", "#ffd8b1", "#000075", "#a9a9a9",
]  # fmt: skip
"""Twenty distinct tints (Trubetskoy's list); a token's tint depends on its index only."""
_TINT_ALPHA = 0.5
_PANEL_INCHES = 1.75
_LABEL_CHARS = 16
"""Characters of a row label's line that fit beside a panel (its height, at the label's size)."""
_CHUNK = 8


@dataclass(frozen=True)
class TokenMap:
    """One image's tokens after one block: which output token covers each patch."""

    owner: np.ndarray
    """``(rows, cols)``: index of the output token that covers each patch, ``PRUNED`` for none."""
    kinds: dict[int, str]
    """Kind of every token that covers a patch: ``kept``, ``merged``, ``dc`` (FATR) or ``fused`` (EViT)."""
    tokens: int
    """Non-prefix tokens the next block computes on (size > 0)."""
    soft: bool
    """Some patch is shared by several tokens (DCT): it is painted with its largest share."""

    @property
    def pruned(self) -> int:
        return int((self.owner == PRUNED).sum())


@dataclass(frozen=True)
class MethodMaps:
    """One method's maps for every image and stage, or why it has none."""

    name: str
    label: str
    """Column title: the method and its solved knob."""
    maps: list[list[TokenMap]]
    """``[image][stage]``; empty when ``problem`` is set."""
    problem: str | None = None
    """Why there is no map (``no source map``, a budget that cannot be met): shown in the panel."""


@dataclass(frozen=True)
class _Snapshot:
    """What a token map needs of a state, on the CPU."""

    source: Tensor | None
    size: Tensor
    pos: Tensor
    num_prefix: int
    num_tokens: int
    dc_slots: int

    @classmethod
    def of(cls, state: TokenState) -> _Snapshot:
        source = None if state.source is None else state.source.detach().float().cpu()
        return cls(
            source,
            state.size.detach().float().cpu(),
            state.pos.detach().cpu(),
            state.num_prefix,
            state.num_tokens,
            int(state.extra.get(FATR_DC_SLOTS, 0)),
        )


def source_problem(source: Tensor | None, num_tokens: int, num_patches: int) -> str | None:
    """Why a state's source map cannot be painted (None: it can): a reducer that dropped it, or
    one that changed the tokens without updating it."""
    if source is None:
        return f"{NO_SOURCE_MAP}: the reducer does not keep TokenState.source"
    if source.dim() != 3 or source.shape[1] != num_tokens or source.shape[2] != num_patches:
        return (
            f"{NO_SOURCE_MAP}: shape {tuple(source.shape)} does not match {num_tokens} tokens x {num_patches} patches"
        )
    return None


def patch_owners(source: Tensor, num_prefix: int) -> tuple[Tensor, bool]:
    """The token that covers each patch ``(P,)`` (``PRUNED`` where no token does) from one
    image's source map ``(N, P)``, and whether the map is soft. Prefix tokens cover no patch.
    A shared patch goes to its largest share (the first on ties), so the owners always
    partition the covered patches."""
    weights = source[num_prefix:].float()
    if weights.shape[0] == 0:
        return torch.full((source.shape[1],), PRUNED, dtype=torch.long), False
    total = weights.sum(0)
    best, arg = weights.max(0)
    covered = total > _EPS
    owner = torch.where(covered, arg + num_prefix, torch.full_like(arg, PRUNED))
    soft = bool(((best < total - _EPS) & covered).any())
    return owner, soft


def token_kinds(
    owner: np.ndarray, source: Tensor, pos: Tensor, num_prefix: int, dc_slots: int, fused: bool
) -> dict[int, str]:
    """Kind of each token that covers a patch, from one image's source map ``(N, P)``. A token
    that is exactly one whole patch is kept, whatever its position says (PiToMe renumbers every
    token); any other is merged. FATR's DC slots, and for a fusing EViT every token that is no
    original patch (``pos`` -1), get their own kind, since that is what those methods add."""
    ids = np.unique(owner[owner != PRUNED]).tolist()
    rows = source[ids].float()
    single = ((rows > _EPS).sum(-1) == 1) & ((rows.amax(-1) - 1).abs() < 1e-4)
    kinds = {}
    for t, one_patch in zip(ids, single.tolist(), strict=True):
        if num_prefix <= t < num_prefix + dc_slots:
            kinds[t] = DC
        elif fused and int(pos[t]) < 0:
            kinds[t] = FUSED
        else:
            kinds[t] = KEPT if one_patch else MERGED
    return kinds


def token_map(snap: _Snapshot, image: int, grid: tuple[int, int], fused: bool) -> TokenMap:
    """One image's :class:`TokenMap` from a state whose source map can be painted."""
    assert snap.source is not None
    owner, soft = patch_owners(snap.source[image], snap.num_prefix)
    owner_np = owner.numpy().reshape(grid)
    kinds = token_kinds(owner_np, snap.source[image], snap.pos[image], snap.num_prefix, snap.dc_slots, fused)
    tokens = int((snap.size[image, snap.num_prefix :] > 0).sum())
    return TokenMap(owner_np, kinds, tokens, soft)


def unreduced_map(grid: tuple[int, int], num_prefix: int) -> TokenMap:
    """Every patch its own token: the state before any reduction."""
    n = grid[0] * grid[1]
    owner = np.arange(num_prefix, num_prefix + n).reshape(grid)
    return TokenMap(owner, dict.fromkeys(owner.ravel().tolist(), KEPT), n, False)


def fuses_tokens(reducer: TokenReducer) -> bool:
    """Whether the reducer is EViT with its fused token (its subclass TopK prunes only)."""
    return isinstance(reducer, EViT) and bool(getattr(reducer, "fuse", False))


def _forward_snapshots(
    model: nn.Module, images: Tensor, blocks: Sequence[int]
) -> tuple[dict[int, _Snapshot], str | None]:
    """One batch's states after the reductions that ``blocks`` read (for each block, the latest
    reduction at or before it; the others are let go, so a method that reduces in every block
    holds a few source maps, not one per block), and why the source map cannot be painted if
    it cannot, at any reduction or after the last block."""
    ctx = reduction_context(model)
    after: dict[int, _Snapshot] = {}
    problems: list[str] = []

    def keep(block: int, before: TokenState, new: TokenState) -> None:
        problem = source_problem(new.source, new.num_tokens, _num_patches(new))
        if problem:
            problems.append(problem)
            return
        if block > max(blocks):
            return
        for k in [k for k in after if not any(k <= b < block for b in blocks)]:
            del after[k]
        after[block] = _Snapshot.of(new)

    observation = ctx.observe(keep)
    try:
        with torch.no_grad():
            model(images)
    finally:
        observation.remove()
    assert ctx.state is not None
    final = source_problem(ctx.state.source, ctx.state.num_tokens, _num_patches(ctx.state))
    return after, (problems or [final])[0]


def _num_patches(state: TokenState) -> int:
    return state.patch_grid[0] * state.patch_grid[1]


def _stage_snapshot(after: dict[int, _Snapshot], stage: int) -> _Snapshot | None:
    """The state after block ``stage``: that of the latest reduction at or before it; None
    before any reduction (every patch still its own token)."""
    done = [b for b in after if b <= stage]
    return after[max(done)] if done else None


def stage_block(stage: int | None, depth: int) -> int:
    """The block after which a stage is read. ``None``, the default, is the state the last
    block's attention sees (after block ``depth - 2``): the most reduced set any attention
    computes on. A reduction inside the last block only shortens its MLP, and DiffRate's
    published schedules end there with the class token and two others, which says nothing."""
    return max(depth - 2, 0) if stage is None else stage


def capture_token_maps(
    model: nn.Module, reducer: TokenReducer, images: Tensor, stages: Sequence[int | None] = (None,)
) -> tuple[list[list[TokenMap]], str | None]:
    """Patch ``model`` with ``reducer`` (source map traced), run ``images`` and read the token
    map of every image at every stage (a block index: the state after that block; None: the
    tokens entering the last block, see :func:`stage_block`). Returns
    ``(maps[image][stage], None)``, or ``([], why)`` when the reducer's source map cannot be
    painted."""
    apply_reducer(model, reducer, trace_source=True)
    info = reduction_context(model).info
    device = next(model.parameters()).device
    fused = fuses_tokens(reducer)
    blocks = [stage_block(stage, info.depth) for stage in stages]
    maps: list[list[TokenMap]] = []
    for start in range(0, len(images), _CHUNK):
        chunk = images[start : start + _CHUNK].to(device)
        after, problem = _forward_snapshots(model, chunk, blocks)
        if problem:
            return [], problem
        grid = reduction_context(model).state.patch_grid
        for i in range(len(chunk)):
            row = []
            for block in blocks:
                snap = _stage_snapshot(after, block)
                row.append(unreduced_map(grid, info.num_prefix) if snap is None else token_map(snap, i, grid, fused))
            maps.append(row)
    return maps, None


# -- drawing ----------------------------------------------------------------------------------------


def tint(token: int) -> str:
    """A token's tint: fixed by its index, so neighbouring indices (often neighbouring regions) differ."""
    return _TINTS[(token * 7) % len(_TINTS)]


def paint(picture: np.ndarray, tm: TokenMap) -> np.ndarray:
    """``picture`` ``(H, W, 3)`` in [0, 1] with merged tokens tinted and pruned patches greyed."""
    from matplotlib.colors import to_rgb

    rows, cols = tm.owner.shape
    ph, pw = picture.shape[0] // rows, picture.shape[1] // cols
    owner = np.kron(tm.owner, np.ones((ph, pw), dtype=tm.owner.dtype))
    out = picture[: rows * ph, : cols * pw].copy()
    luminance = out @ np.array([0.299, 0.587, 0.114])
    grey = (0.45 + 0.25 * luminance)[..., None].repeat(3, axis=-1)
    out = np.where((owner == PRUNED)[..., None], grey, out)
    for token, kind in tm.kinds.items():
        if kind == KEPT:
            continue
        here = owner == token
        out[here] = (1 - _TINT_ALPHA) * out[here] + _TINT_ALPHA * np.array(to_rgb(tint(token)))
    return out


def boundary_segments(owner: np.ndarray, ph: float, pw: float) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Line segments (pixel coordinates) between patches of different tokens; none between two
    pruned patches. Together they outline every token's region."""
    segments = []
    rows, cols = owner.shape
    for r in range(rows):
        for c in range(cols):
            a = owner[r, c]
            if c + 1 < cols and a != owner[r, c + 1] and not (a == PRUNED == owner[r, c + 1]):
                x = (c + 1) * pw - 0.5
                segments.append(((x, r * ph - 0.5), (x, (r + 1) * ph - 0.5)))
            if r + 1 < rows and a != owner[r + 1, c] and not (a == PRUNED == owner[r + 1, c]):
                y = (r + 1) * ph - 0.5
                segments.append(((c * pw - 0.5, y), ((c + 1) * pw - 0.5, y)))
    return segments


def _hatch(ax, tm: TokenMap, ph: float, pw: float) -> None:
    """Hatch the patches of FATR's DC tokens and EViT's fused token."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    special = {t for t, k in tm.kinds.items() if k in SPECIAL}
    cells = [
        Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph)
        for r, c in zip(*np.nonzero(np.isin(tm.owner, list(special))), strict=True)
    ]
    if cells:
        ax.add_collection(
            PatchCollection(cells, facecolor="none", edgecolor=(1, 1, 1, 0.75), linewidth=0, hatch="////")
        )


def draw_panel(ax, picture: np.ndarray, tm: TokenMap) -> None:
    """One token map on one axis: tints, hatching, outlines, and the token count."""
    from matplotlib.collections import LineCollection

    rows, cols = tm.owner.shape
    ph, pw = picture.shape[0] / rows, picture.shape[1] / cols
    ax.imshow(paint(picture, tm), interpolation="nearest")
    _hatch(ax, tm, ph, pw)
    ax.add_collection(LineCollection(boundary_segments(tm.owner, ph, pw), colors="white", linewidths=0.5, alpha=0.8))
    text = f"{tm.tokens} tokens" + (f", {tm.pruned} pruned" if tm.pruned else "")
    _corner_text(ax, text)


def _corner_text(ax, text: str) -> None:
    ax.text(
        0.98, 0.02, text, transform=ax.transAxes, ha="right", va="bottom", fontsize=6, color="white",
        bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "linewidth": 0},
    )  # fmt: skip


def draw_problem(ax, picture: np.ndarray, problem: str) -> None:
    """A panel that says why there is no map, over a faded image: an honest gap, not a guess."""
    import textwrap

    ax.imshow(0.25 + 0.5 * picture, interpolation="nearest")
    ax.text(
        0.5, 0.5, textwrap.fill(problem, 24), transform=ax.transAxes, ha="center", va="center", fontsize=6.5,
        bbox={"facecolor": "white", "alpha": 0.85, "linewidth": 0},
    )  # fmt: skip


def _legend_proxies(ax, methods: Sequence[MethodMaps]) -> None:
    """Legend entries for the kinds the figure shows (zero-size patches on ``ax``; :func:`save`
    gathers them into the one legend at the right)."""
    from matplotlib.patches import Rectangle

    seen = {k for m in methods for row in m.maps for tm in row for k in tm.kinds.values()}
    pruned = any(tm.pruned for m in methods for row in m.maps for tm in row)
    soft = any(tm.soft for m in methods for row in m.maps for tm in row)
    hatched = {"facecolor": _TINTS[0], "hatch": "////", "edgecolor": "white"}
    entries = [
        (KEPT in seen, "clear square: a patch kept as its own token\n(FATR: a high-frequency token)", {}),
        (MERGED in seen, "one tint, one outline: a merged token\nand the patches it covers", {"facecolor": _TINTS[3]}),
        (DC in seen, "tinted and hatched: a FATR DC token\n(the low-frequency patches of its window)", hatched),
        (FUSED in seen, "tinted and hatched: EViT's fused token\n(the inattentive patches)", hatched),
        (pruned, "grey: a pruned patch (no token covers it)", {"facecolor": "#8c8c8c"}),
        (soft, "soft map (DCT): each patch painted with\nthe token holding its largest share", {"facecolor": "none"}),
    ]
    for show, label, style in entries:
        if show:
            style = {"facecolor": "white", "edgecolor": "#444444", **style}
            ax.add_patch(Rectangle((0, 0), 0, 0, label=label, linewidth=0.6, **style))


def stage_name(stage: int | None) -> str:
    return "entering the last block" if stage is None else f"after block {stage}"


def fit_label(text: str, width: int = _LABEL_CHARS) -> str:
    """``text`` with every line longer than ``width`` broken, after the last ``_``, ``-`` or
    space that keeps the part within ``width`` (else at ``width``): a row label runs along the
    panel's height, and ImageNet's file names (``ILSVRC2012_val_00023559``) ran into the next
    row's label."""
    out = []
    for line in text.split("\n"):
        while len(line) > width:
            cut = max(line.rfind(sep, 0, width) for sep in "_- ") + 1 or width
            out.append(line[:cut].rstrip())
            line = line[cut:]
        out.append(line)
    return "\n".join(out)


def draw_token_maps(
    pictures: np.ndarray,
    names: Sequence[str],
    methods: Sequence[MethodMaps],
    out: Path,
    title: str,
    stages: Sequence[int | None] = (None,),
) -> Path:
    """The grid: one row per image (and stage), the input image first, then one column per
    method. ``pictures`` ``(images, H, W, 3)`` in [0, 1], as the model sees them (cropped)."""
    n_rows, n_cols = len(pictures) * len(stages), 1 + len(methods)
    fig, axes = figure(ncols=n_cols, nrows=n_rows, width=_PANEL_INCHES * n_cols, height=_PANEL_INCHES * n_rows + 0.4)
    for i, picture in enumerate(pictures):
        for s, stage in enumerate(stages):
            row = i * len(stages) + s
            first = axes[row * n_cols]
            first.imshow(picture, interpolation="nearest")
            label = names[i] if len(stages) == 1 else f"{names[i]}\n{stage_name(stage)}"
            first.set_ylabel(fit_label(label), fontsize=7)
            for j, method in enumerate(methods):
                ax = axes[row * n_cols + 1 + j]
                if method.problem:
                    draw_problem(ax, picture, method.problem)
                else:
                    draw_panel(ax, picture, method.maps[i][s])
                if row == 0:
                    ax.set_title(method.label, fontsize=7.5, color=method_color(method.name))
            if row == 0:
                first.set_title("input (as the model sees it)", fontsize=7.5)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    _legend_proxies(axes[0], methods)
    out.parent.mkdir(parents=True, exist_ok=True)
    return compact_png(save(fig, out, title, legend_ax=axes[0]))


def compact_png(path: Path) -> Path:
    """Re-save a PNG with 256 dithered colours: photos make a grid of panels ten times the
    size of the other result figures (2 MB), which a repository carries in every version."""
    from PIL import Image

    if path.suffix.lower() != ".png":
        return path
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG).save(
        path, optimize=True
    )
    return path


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Model inputs ``(N, 3, H, W)`` back to pictures ``(N, H, W, 3)`` in [0, 1]."""
    m = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    return (images.float().cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def knob_text(budget: dict) -> str:
    """``r=9``, ``keep_rate=0.69``: the solved knob a column was drawn at."""
    knob, value = budget.get("knob"), budget.get("knob_value")
    if not knob or value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{knob}={value:.3g}" if isinstance(value, (int, float)) else f"{knob}={value}"
