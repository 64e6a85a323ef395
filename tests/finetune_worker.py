"""One process of a ``torchrun`` fine-tuning test (not collected by pytest): trains the tiny
FATR ViT the test also trains in a single process, and leaves the per-step log in OUT_DIR."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from test_finetune import TINY_RECIPE, tiny_run  # noqa: E402

from bench.train.trainer import Recipe, init_distributed, train  # noqa: E402

if __name__ == "__main__":
    folder, out_dir, micro = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    dist_, device = init_distributed(torch.device("cpu"))
    student, teacher, data = tiny_run(folder)
    recipe = Recipe(**{**TINY_RECIPE, "micro_batch": micro})
    train(student, teacher, data, recipe, out_dir, {"test": 1}, device=device, dist_=dist_, progress=False)
    torch.distributed.destroy_process_group()
