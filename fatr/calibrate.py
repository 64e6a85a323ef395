"""Fit FATR's ω (a few dozen numbers) so the reduced model mimics the unreduced one.

Only ω1 (per block and head) and ω2 (per block) are trained; every weight of the model is
frozen. The loss is KL(unreduced ‖ reduced) on the predictions for a calibration folder, so no
labels are needed. The evaluation images must never be used here: the command refuses a
calibration folder that is, or shares files with, the evaluation folder.

    python -m fatr.calibrate --calib-root ../shared/data/imagenet-calib-1000 --out omega.pt

then ``python -m bench.run method=fatr method.reducer.omega_path=omega.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from fatr.reducer import FATR
from methods import apply_reducer, remove_reducer


def batched_logits(model: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def fit_omega(
    model: nn.Module,
    reducer: FATR,
    images: Tensor,
    epochs: int = 2,
    batch_size: int = 50,
    lr: float = 0.05,
    seed: int = 0,
    show_progress: bool = True,
) -> list[float]:
    """Train ω on ``images``; returns the mean KL of each epoch. Leaves ``reducer`` applied."""
    remove_reducer(model)
    model.eval()
    teacher = batched_logits(model, images, batch_size).log_softmax(-1)
    for p in model.parameters():
        p.requires_grad_(False)
    apply_reducer(model, reducer)
    reducer.omega1.requires_grad_(True)
    reducer.omega2.requires_grad_(True)
    opt = torch.optim.Adam([reducer.omega1, reducer.omega2], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    steps = epochs * ((len(images) + batch_size - 1) // batch_size)
    bar = tqdm(total=steps, desc="fitting FATR ω", disable=not show_progress)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        total = 0.0
        for i in range(0, len(images), batch_size):
            idx = order[i : i + batch_size]
            student = model(images[idx]).log_softmax(-1)
            loss = F.kl_div(student, teacher[idx], log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            bar.update(1)
            bar.set_postfix(kl=f"{loss.item():.4f}")
        history.append(total / len(images))
    bar.close()
    reducer.omega1.requires_grad_(False)
    reducer.omega2.requires_grad_(False)
    return history


def save_omega(reducer: FATR, path: str | Path, meta: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"omega1": reducer.omega1.detach().cpu(), "omega2": reducer.omega2.detach().cpu(), "meta": meta}, tmp)
    os.replace(tmp, path)
    return path


def check_disjoint(calib_root: str, eval_root: str | None) -> None:
    """Refuse calibration on the evaluation images (same folder, or any shared file name)."""
    from bench.data import list_images
    from bench.errors import BenchError

    if not eval_root or not Path(eval_root).exists():
        return
    if Path(calib_root).resolve() == Path(eval_root).resolve():
        raise BenchError(f"calibration folder {calib_root} is the evaluation folder: ω must not see eval images")
    calib = {p.name for p, _ in list_images(calib_root, require_known_classes=False)}
    shared = calib & {p.name for p, _ in list_images(eval_root)}
    if shared:
        raise BenchError(
            f"calibration folder shares {len(shared)} images with the evaluation folder {eval_root} "
            f"(e.g. {sorted(shared)[0]}): ω must not see eval images"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m fatr.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--checkpoint", default=os.environ.get("FATR_CHECKPOINT"), help="weights (env FATR_CHECKPOINT)")
    ap.add_argument("--pretrained", action="store_true", help="timm hub weights instead of --checkpoint")
    ap.add_argument("--random-init", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--calib-root", default=os.environ.get("FATR_CALIB_ROOT"), help="image folder (env FATR_CALIB_ROOT)"
    )
    ap.add_argument("--eval-root", default=os.environ.get("FATR_DATA_ROOT"), help="evaluation folder to stay away from")
    ap.add_argument("--out", required=True, help="where to save ω (.pt)")
    ap.add_argument("--blocks", type=int, nargs="+", default=[3, 6, 9])
    ap.add_argument("--keep-rate", type=float, default=0.7)
    ap.add_argument(
        "--macs-ratio",
        type=float,
        default=None,
        help="solve the keep rate for this MACs budget, as bench.run's budget.macs_ratio does",
    )
    ap.add_argument("--score", default="signed")
    ap.add_argument("--dc-grid", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--limit", type=int, default=None, help="use only N calibration images")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from bench.data import load_imagenet_folder
    from bench.errors import BenchError
    from bench.models import load_model
    from methods import ReducerConfigError

    args = parse_args(argv)
    try:
        if not args.calib_root:
            raise BenchError("no calibration folder: pass --calib-root DIR or set FATR_CALIB_ROOT")
        check_disjoint(args.calib_root, args.eval_root)
        torch.manual_seed(args.seed)
        model = load_model(args.model, args.checkpoint, args.pretrained, random_init=args.random_init)
        reducer = FATR(blocks=args.blocks, keep_rate=args.keep_rate, score=args.score, dc_grid=args.dc_grid)
        if args.macs_ratio is not None:
            from bench.budget import match_budget
            from bench.flops import VitShape
            from methods.patch import model_info

            reducer = match_budget(
                reducer, args.macs_ratio, VitShape.of(model), model_info(model), method="fatr"
            ).reducer
        data = load_imagenet_folder(args.calib_root, model, limit=args.limit, require_known_classes=False)
        t0 = time.perf_counter()
        history = fit_omega(model, reducer, data.images, args.epochs, args.batch_size, args.lr, args.seed)
    except (BenchError, ReducerConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = {
        "model": args.model,
        "blocks": args.blocks,
        "keep_rate": reducer.hparams["keep_rate"],
        "macs_ratio": args.macs_ratio,
        "score": args.score,
        "dc_grid": args.dc_grid,
        "calib_root": str(Path(args.calib_root).resolve()),
        "num_images": len(data),
        "epochs": args.epochs,
        "kl_per_epoch": history,
        "seconds": time.perf_counter() - t0,
    }
    out = save_omega(reducer, args.out, meta)
    print(f"saved ω to {out}: KL per epoch {', '.join(f'{h:.4f}' for h in history)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
