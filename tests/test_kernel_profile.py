"""``bench.kernel_profile``: a report per method with the reducer's share, and bad input refused."""

from __future__ import annotations

import pytest

from bench import kernel_profile
from bench.measure import compiling


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
        (["--compile=turbo"], "--compile turbo: choose from eager, compile, max-autotune, cudagraphs, cpp-wrapper"),
        (["--compile=cudagraphs"], "--compile cudagraphs needs a CUDA device (CUDA graphs); this runs on cpu"),
        (["--model=test_vit", "--methods=evit"], "reduction block index 6 is outside the model's depth"),
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


def test_a_compiled_profile_says_how_it_ran_and_leaves_out_the_reducer_share(tmp_path, monkeypatch):
    """``--compile``: the forward as that mode of ``bench.latency.compile`` runs it (dynamo's
    eager backend here, to keep the test fast: the same capture, no kernels generated). The
    reducer's range would be traced away, so no share is claimed; the compile time is given."""
    monkeypatch.setitem(compiling.COMPILE_MODES, "compile", {"backend": "eager"})
    out = tmp_path / "profile.txt"
    argv = ["--methods=none,tome", "--model=test_vit", "--iters=1", "--rows=3", "--device=cpu", "--compile=compile"]
    graphs = compiling.compiled_graphs()
    assert kernel_profile.main([*argv, f"--out={out}"]) == 0
    assert compiling.compiled_graphs() >= graphs + 2  # each model ran as one captured graph
    text = out.read_text()
    assert "test_vit (random weights), batch 1, fp32, torch.compile (inductor), MACs ratio 0.65" in text
    tome = text.split("## tome")[1]
    assert "reducer's steps" not in tome and "the reducer's share is not separable" in tome
    assert float(tome.split("compiled and warmed up in ")[1].split(" s")[0]) > 0
