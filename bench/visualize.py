"""Entry point: ``python -m bench.visualize method=fatr,tome,evit``: token maps of a few images.

For each image and each method, the image with every output token's patches outlined and
tinted (see :mod:`bench.report.token_maps`). It reads the same Hydra config as ``bench.run``
(``bench/conf/visualize.yaml`` is ``config.yaml`` plus a ``visualize`` section): the same
weights and images resolution, and each method's knob solved for ``budget.macs_ratio``, so the
maps show the configurations the leaderboard measures. ``method=a,b,c`` draws the methods side
by side in one figure (no sweep: one process, one figure); without it, ``fatr,tome,evit``.

    python -m bench.visualize method=fatr,tome,evit,pool visualize.images=6
    python -m bench.visualize method=fatr,tome visualize.paths=[cat.jpg,street.png]
    python -m bench.visualize method=fatr,evit visualize.blocks=[3,6,9]   # one row per block
    python -m bench.visualize method=tome budget.macs_ratio=null method.reducer.r=8

The figure goes to ``visualize.out`` (default ``<results_dir>/token_maps.png``). Bad input
(a missing or unreadable image, ``visualize.images=0``, an unknown method) is one ``error:``
line and exit status 2; a method that cannot run here (an impossible budget) gets a panel that
says why, one ``error:`` line, and the figure is still written (exit status 2).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig
from PIL import Image
from timm.data import resolve_model_data_config
from tqdm.auto import tqdm

from bench.budget import refuse_overridden_knob, solve_budget
from bench.data import eval_transform, list_images, oversized_image, spread, to_rgb
from bench.errors import BenchError
from bench.job import build_reducer_from_config, resolve_device
from bench.models import load_model, set_resolution
from bench.report.token_maps import MethodMaps, capture_token_maps, denormalize, draw_token_maps, knob_text
from bench.results_io import check_writable
from bench.run import USER_ERRORS
from bench.sources import RANDOM_WEIGHTS, REAL_WEIGHTS, resolve_sources
from bench.terminal import say
from bench.validate import check_budget

CONF_DIR = Path(__file__).resolve().parent / "conf"
DEFAULT_METHODS = ["fatr", "tome", "evit"]
PUBLISHED = ["budget.macs_ratio=0.65", "visualize.images=4", "visualize.blocks=null", "visualize.paths=[]"]
"""The published figure's settings (:func:`write_token_maps`): the leaderboard's budget, four
validation images, the tokens entering the last block."""


@dataclass(frozen=True)
class Settings:
    """The ``visualize`` section, checked."""

    images: int
    paths: list[Path]
    stages: list[int | None]
    """Blocks after which the tokens are drawn; ``[None]``: the tokens entering the last block."""
    out: Path


@dataclass(frozen=True)
class Pictures:
    """The images as the model gets them, and a name for each row."""

    inputs: torch.Tensor
    names: list[str]


def split_methods(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """``method=a,b`` -> ``[a, b]`` and the other overrides: every method goes into one figure,
    so the comma is a list here, not a Hydra sweep."""
    methods: list[str] = []
    rest = []
    for entry in overrides:
        key, sep, value = entry.partition("=")
        if sep and key.lstrip("+") == "method":
            methods += [m.strip() for m in value.split(",") if m.strip()]
        else:
            rest.append(entry)
    return list(dict.fromkeys(methods or DEFAULT_METHODS)), rest


def compose_configs(methods: Sequence[str], overrides: Sequence[str]) -> list[DictConfig]:
    """One composed config per method, as ``bench.run`` would get it with these overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException

    from bench.validate import config_error

    sweeps = [o.input_line for o in OverridesParser.create().parse_overrides(list(overrides)) if o.is_sweep_override()]
    if sweeps:
        raise BenchError(
            f"{sweeps[0]}: bench.visualize draws one figure of one configuration per method; only method= takes "
            "a comma-separated list (run the command once per value)"
        )
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="visualize"):
            return [compose(config_name="visualize", overrides=[f"method={m}", *overrides]) for m in methods]
    except ConfigCompositionException as e:  # a wrong type or a group option that is not there: one line
        error = config_error(e)
        if error is None:
            raise
        raise error from None


def _positive_int(value: object, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BenchError(f"{key} must be an integer >= 1, got {value!r}")
    return value


def _as_list(value: object) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (ListConfig, list, tuple)) else [value]


def read_settings(cfg: DictConfig) -> Settings:
    """The checked ``visualize`` section: a count or existing files, block indices, an output
    path whose folder can be written."""
    check_budget(cfg)  # budget.macs_ratio=2: one line, before any method is drawn
    vis = cfg.visualize
    paths = [Path(str(p)).expanduser() for p in _as_list(vis.get("paths"))]
    for p in paths:
        if not p.exists():
            raise BenchError(f"visualize.paths: {p} does not exist")
        if not p.is_file():
            raise BenchError(f"visualize.paths: {p} is not a file")
    images = len(paths) if paths else _positive_int(vis.get("images"), "visualize.images")
    blocks = vis.get("blocks")
    stages: list[int | None] = [None]
    if blocks is not None:
        stages = [_block_index(b) for b in _as_list(blocks)]
        if not stages:
            raise BenchError("visualize.blocks must be null or a non-empty list of block indices, got []")
    out = Path(str(vis.get("out"))).expanduser()
    if out.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):
        raise BenchError(f"visualize.out must end in .png, .pdf, .svg or .jpg, got {out}")
    check_writable(out.parent)
    return Settings(images, paths, stages, out)


def _block_index(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BenchError(f"visualize.blocks must hold block indices (integers >= 0), got {value!r}")
    return value


def read_image(path: Path) -> Image.Image:
    """A whole decoded RGB image, or one line saying why it cannot be read."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im, path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise oversized_image(path, e) from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL: UnidentifiedImageError is an OSError
        raise BenchError(
            f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def folder_images(root: str, count: int) -> list[tuple[Path, str]]:
    """``count`` images of an ImageNet val folder, evenly spaced over its classes, each named
    by its file and class."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    items = list_images(root)
    chosen = [items[i] for i in spread(len(items), count)]
    return [(p, f"{p.stem}\n{info.index_to_description(label).split(',')[0]}") for p, label in chosen]


def _check_weights(cfg: DictConfig) -> None:
    if cfg.model.get("random_init") and not cfg.model.get("checkpoint"):
        raise BenchError(
            f"{RANDOM_WEIGHTS}: which tokens a method keeps or merges depends on what the model learned, "
            f"so token maps on random weights would mean nothing; {REAL_WEIGHTS}"
        )


def _check_stages(stages: Sequence[int | None], depth: int) -> None:
    bad = [b for b in stages if b is not None and b >= depth]
    if bad:
        raise BenchError(f"visualize.blocks {bad} outside the model's {depth} blocks (0..{depth - 1})")


def _fresh_model(cfg: DictConfig) -> torch.nn.Module:
    model = load_model(cfg.model.name, cfg.model.checkpoint, cfg.model.pretrained)
    if cfg.model.get("img_size"):
        set_resolution(model, int(cfg.model.img_size))
    return model


def method_maps(
    cfg: DictConfig, overrides: Sequence[str], pictures: Pictures, stages: Sequence[int | None], device: torch.device
) -> tuple[MethodMaps, str | None]:
    """One method's maps at its budget, or a panel (and an error line) saying why it has none."""
    name = str(cfg.method.name)
    try:
        reducer = build_reducer_from_config(cfg.method)
        refuse_overridden_knob(reducer, cfg.budget.macs_ratio, name, list(overrides))
        model = _fresh_model(cfg)
        reducer, budget = solve_budget(reducer, cfg.budget.macs_ratio, cfg.budget.tolerance, model, name)
        maps, problem = capture_token_maps(model.to(device), reducer, pictures.inputs, stages)
    except USER_ERRORS as e:
        return MethodMaps(name, name, [], f"not drawn: {e}"), f"method {name}: {e}"
    knob = knob_text(budget)
    return MethodMaps(name, f"{name}\n{knob}" if knob else name, maps, problem), None


def load_pictures(cfg: DictConfig, settings: Settings) -> tuple[list[Image.Image], list[str]]:
    """The decoded images (a user's files, else spread over ``data.root``) and their row names;
    read before any model is loaded, so an unreadable file fails in a second."""
    if settings.paths:
        named = [(p, p.name) for p in settings.paths]
    else:
        named = folder_images(str(cfg.data.root), settings.images)
    return [read_image(p) for p, _ in named], [name for _, name in named]


def _title(cfg: DictConfig, stages: Sequence[int | None], count: int) -> str:
    ratio = cfg.budget.macs_ratio
    budget = (
        "each method at its own knob" if ratio is None else f"every method at {float(ratio):.2f} of the unreduced MACs"
    )
    when = "entering the last block" if stages == [None] else "after each block shown"
    return f"Token maps of {cfg.model.name}, {budget}: the tokens {when} ({count} images)"


def prepare_pictures(cfg: DictConfig, settings: Settings) -> tuple[DictConfig, Pictures, np.ndarray]:
    """The config with its weights and images resolved, the images as the model gets them, and
    as a person sees them. A user's files are read first: a bad one fails before anything loads."""
    images, names = load_pictures(cfg, settings) if settings.paths else ([], [])
    cfg = resolve_sources(cfg, images=not settings.paths)
    _check_weights(cfg)
    if not settings.paths:
        images, names = load_pictures(cfg, settings)
    model = _fresh_model(cfg)
    _check_stages(settings.stages, len(model.blocks))
    transform = eval_transform(model, cfg.model.get("img_size"))
    pictures = Pictures(torch.stack([transform(im) for im in images]), names)
    data = resolve_model_data_config(model)
    return cfg, pictures, denormalize(pictures.inputs, data["mean"], data["std"])


def token_maps(overrides: Sequence[str]) -> tuple[Path | None, list[str]]:
    """Draw the figure the command draws; returns its path (None where every method failed:
    nothing drawn, nothing overwritten) and one line per method that failed."""
    methods, rest = split_methods(overrides)
    cfgs = compose_configs(methods, rest)
    settings = read_settings(cfgs[0])
    cfg, pictures, shown = prepare_pictures(cfgs[0], settings)
    device = resolve_device(cfg.device)
    panels, errors = [], []
    with tqdm(total=len(cfgs) + 1, desc="token maps", disable=not cfg.get("progress", True), leave=False) as bar:
        for method_cfg in cfgs:
            bar.set_postfix_str(str(method_cfg.method.name))
            resolved = resolve_sources(method_cfg, announce=False, images=False)
            panel, error = method_maps(resolved, rest, pictures, settings.stages, device)
            panels.append(panel)
            if error:
                say(f"error: {error}")
                errors.append(error)
            bar.update()
        if len(errors) == len(cfgs):  # nothing to draw (each error said): keep the figure an earlier call wrote
            return None, errors
        bar.set_postfix_str("drawing")
        title = _title(cfg, settings.stages, len(pictures.names))
        path = draw_token_maps(shown, pictures.names, panels, settings.out, title, settings.stages)
        bar.update()
    return path, errors


def write_token_maps(results_dir: str | Path, methods: str, overrides: Sequence[str] = ()) -> Path:
    """The published figure, ``<results_dir>/token_maps.png``: ``methods`` (comma-separated) at
    MACs 0.65 on four validation images, the tokens entering the last block. ``bench.publish``
    calls it after the sweeps; a method that cannot be drawn raises :class:`BenchError`."""
    path, errors = token_maps([f"method={methods}", f"results_dir={results_dir}", *PUBLISHED, *overrides])
    if errors or path is None:
        raise BenchError("token maps: " + "; ".join(errors))
    return path


def _one_line(e: Exception) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """The command: draw, say where the figure is; bad input is one ``error:`` line, status 2."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    try:
        path, errors = token_maps(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if path is not None:
        print(f"token maps: {path}")
    return 2 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
