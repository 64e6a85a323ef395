"""``bench.kernel_profile``: a report per method with the reducer's share, and bad input refused."""

from __future__ import annotations

import pytest

from bench import kernel_profile


def test_a_report_names_the_setting_and_each_method_with_its_reducer_share(tmp_path, capsys):
    out = tmp_path / "profile.txt"
    rc = kernel_profile.main(
        [
            "--methods=none,evit",
            "--model=vit_tiny_patch16_224",
            "--batch=1",
            "--iters=1",
            "--rows=3",
            "--device=cpu",
            f"--out={out}",
        ]
    )
    assert rc == 0
    text = out.read_text()
    assert "vit_tiny_patch16_224 (random weights), batch 1, fp32, eager" in text
    assert "## none" in text and "## evit" in text
    none, evit = text.split("## none")[1].split("## evit")
    assert "in the reducer's steps 0.000 ms (0%)" in none  # the unreduced model has no reducer step
    share = evit.split("in the reducer's steps ")[1].split(" ms")[0]
    assert float(share) > 0  # EViT's steps ran inside the profiler range


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods=nosuch"], "unknown method 'nosuch'"),
        (["--batch=0"], "must be at least 1"),
        (["--methods=,"], "names no method"),
        (["--macs-ratio=1.5"], "--macs-ratio must be in (0, 1]"),
        (["--device=foo"], "--device foo is not a device"),
        (["--model=nosuch"], "unknown model 'nosuch'"),
        (["--model=resnet18", "--methods=none"], "needs a timm VisionTransformer (ViT, DeiT, ...), got ResNet"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(argv, message, capsys):
    assert kernel_profile.main(["--device=cpu", "--iters=1", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_a_model_at_another_resolution_is_fed_its_own_input_size(capsys):
    argv = ["--methods=none", "--model=vit_tiny_patch16_384", "--iters=1", "--rows=1", "--device=cpu"]
    assert kernel_profile.main(argv) == 0
    assert "vit_tiny_patch16_384 (random weights), batch 1" in capsys.readouterr().out
