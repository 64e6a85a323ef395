"""Properties of the interface, the ViT patch, ToMe and EViT on tiny random ViTs."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from conftest import build_reducer, one_config_per_reducer, tiny_distilled_vit, tiny_vit
from helpers import patch_sizes, run_capturing
from omegaconf import OmegaConf

from bench.errors import BenchError
from bench.job import build_reducer_from_config
from methods import ReducerConfigError, TokenReducer, UnsupportedModelError, apply_reducer, remove_reducer
from methods.tome import bipartite_groups, mask_prefix_edges, tome_schedule

VARIANTS = {
    "plain": {},
    "distilled": {"_cls": "distilled"},
    "registers": {"reg_tokens": 4},
    "layerscale_qknorm": {"init_values": 1e-1, "qk_norm": True},
    "avgpool": {"global_pool": "avg", "class_token": True},
    "avgpool_no_cls": {"global_pool": "avg", "class_token": False},
}


def make_variant(name):
    kw = dict(VARIANTS[name])
    if kw.pop("_cls", None) == "distilled":
        return tiny_distilled_vit()
    return tiny_vit(**kw)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_reduction_is_exact_and_removable(variant, images):
    model = make_variant(variant)
    with torch.no_grad():
        ref = model(images)
    for name, kw in [("none", {}), ("tome", {"r": 0})]:
        logits, steps, _ = run_capturing(model, build_reducer(name, **kw), images)
        assert torch.equal(logits, ref), name
        assert steps == []
    if model.num_prefix_tokens:
        logits, steps, _ = run_capturing(model, build_reducer("evit", blocks=[1, 3], keep_rate=1.0), images)
        assert (logits - ref).abs().max() < 1e-5
    remove_reducer(model)
    assert type(model).__name__ in ("VisionTransformer", "VisionTransformerDistilled")
    assert not hasattr(model, "token_reducer")
    with torch.no_grad():
        assert torch.equal(model(images), ref)


REDUCERS = [
    ("tome", {"r": 5}),
    ("tome", {"r": 4, "inflection": 0.5}),
    ("tome", {"r": [9, 0, 7, 3]}),
    ("evit", {"blocks": [1, 3], "keep_rate": 0.6}),
    ("evit", {"blocks": [0, 2, 4], "keep_rate": [0.9, 0.5, 0.7], "fuse": False}),
]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name,kw", REDUCERS)
def test_reducer_properties(variant, name, kw, images):
    model = make_variant(variant)
    if name == "evit" and model.num_prefix_tokens == 0:
        with pytest.raises(ReducerConfigError, match="class token"):
            apply_reducer(model, build_reducer(name, **kw))
        return
    reducer = build_reducer(name, **kw)
    logits, steps, ctx = run_capturing(model, reducer, images)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    num_patches = 64
    prefix = model.num_prefix_tokens
    counts = reducer.token_counts(prefix, num_patches, len(model.blocks))
    assert ctx.token_trace == [out for _, out in counts]
    assert steps, "reducer never ran"
    pruning = name == "evit" and not kw.get("fuse", True)
    for _, before, after in steps:
        assert after.x.shape[:2] == after.size.shape == after.pos.shape
        assert torch.equal(after.x[:, :prefix], before.x[:, :prefix]), "prefix tokens changed"
        assert torch.all(after.size[:, :prefix] == 1)
        src = after.source[:, prefix:]
        assert torch.all(after.source[:, :prefix] == 0)
        assert torch.allclose(src.sum(-1), patch_sizes(after)), "source map disagrees with sizes"
        cover = src.sum(1)
        if pruning:
            assert torch.all((cover == 0) | (cover == 1)), "pruned source map must be a subset"
        else:
            assert torch.all(cover == 1), "source map must partition the grid"
            assert torch.allclose(patch_sizes(after).sum(-1), torch.full((3,), float(num_patches)))


def test_batch_size_one_and_odd_token_counts():
    # 7x7 grid with cls + dist = 51 tokens (odd), batch of one
    from timm.models.deit import VisionTransformerDistilled

    model = VisionTransformerDistilled(img_size=28, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5)
    model.eval()
    x = torch.randn(1, 3, 28, 28)
    for name, kw in [("tome", {"r": 7}), ("evit", {"blocks": [1, 2], "keep_rate": 0.55})]:
        reducer = build_reducer(name, **kw)
        logits, steps, ctx = run_capturing(model, reducer, x)
        assert logits.shape == (1, 5)
        assert ctx.token_trace == [o for _, o in reducer.token_counts(2, 49, 4)]


def test_bf16_autocast_runs(images):
    model = tiny_vit()
    for name, kw in REDUCERS:
        apply_reducer(model, build_reducer(name, **kw))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
        assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("precision", ["bf16-autocast", "bf16-model", "fp16-model"])
@pytest.mark.parametrize("name", one_config_per_reducer())
def test_every_method_runs_in_half_precision(name, precision):
    """Under bf16 autocast (as the GPU sweeps run) and in a model converted to bf16 or fp16
    (``model.half()``, as many deploy): tokens, sizes and scores in lower precision, at the
    default knob of a 12-block model, and the logits stay finite."""
    model = tiny_vit(depth=12)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    autocast = precision == "bf16-autocast"
    if not autocast:
        dtype = torch.bfloat16 if precision == "bf16-model" else torch.float16
        model, x = model.to(dtype), x.to(dtype)
    apply_reducer(model, build_reducer(name))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    assert torch.isfinite(out.float()).all() and (autocast or out.dtype == x.dtype)


def _reference_tome(x, metric, size, r, prefix):
    """Slow per-image ToMe: loops over tokens, returns merged tokens in the patch's order."""
    outs = []
    for b in range(x.shape[0]):
        n = x.shape[1]
        m = metric[b] / metric[b].norm(dim=-1, keepdim=True)
        a_tok, b_tok = list(range(0, n, 2)), list(range(1, n, 2))
        best = {}
        for i in a_tok:
            if i < prefix:
                continue
            sims = [(float(m[i] @ m[j]), j) for j in b_tok if j >= prefix]
            s, j = max(sims, key=lambda t: t[0])
            best[i] = (s, j)
        merged = sorted(best, key=lambda i: -best[i][0])[:r]
        acc = {j: (x[b, j] * size[b, j], size[b, j].clone()) for j in b_tok}
        for i in merged:
            j = best[i][1]
            acc[j] = (acc[j][0] + x[b, i] * size[b, i], acc[j][1] + size[b, i])
        rows = [x[b, i] for i in range(prefix)]
        rows += [x[b, i] for i in a_tok if i >= prefix and i not in merged]
        rows += [acc[j][0] / acc[j][1] for j in b_tok if j >= prefix]
        outs.append(torch.stack(rows))
    return torch.stack(outs)


@pytest.mark.parametrize("prefix", [1, 2])
def test_tome_matches_slow_reference(prefix):
    g = torch.Generator().manual_seed(3)
    x, metric = torch.randn(2, 21, 8, generator=g), torch.randn(2, 21, 5, generator=g)
    size = torch.randint(1, 4, (2, 21), generator=g).float()
    size[:, :prefix] = 1
    from methods.base import TokenState
    from methods.tokens import merge_all

    state = TokenState(
        x=x, size=size, pos=torch.zeros(2, 21, dtype=torch.long), num_prefix=prefix, patch_grid=(4, 5), grid=None
    )
    group, n_out = bipartite_groups(metric, 6, prefix)
    out = merge_all(state, group, n_out)
    ref = _reference_tome(x, metric, size, 6, prefix)
    assert out.x.shape == ref.shape == (2, 15, 8)
    assert torch.allclose(out.x, ref, atol=1e-5)


def _three_scatter_merge(state, group, num_groups, weight=None):
    """The merge written plainly: left-out tokens (group -1) add zeros to group 0; tokens,
    weights and sizes each in their own scatter-add, in token order."""
    x, size = state.x, state.size
    w = size if weight is None else weight
    valid = group >= 0
    g = torch.where(valid, group, 0)
    w = torch.where(valid, w, 0)
    acc = torch.promote_types(x.dtype, torch.float32)
    idx = g[..., None].expand(-1, -1, x.shape[-1])
    sums = x.new_zeros(x.shape[0], num_groups, x.shape[-1], dtype=acc).scatter_add_(
        1, idx, x.to(acc) * w[..., None].to(acc)
    )
    wsum = size.new_zeros(x.shape[0], num_groups, dtype=acc).scatter_add_(1, g, w.to(acc))
    new_size = size.new_zeros(x.shape[0], num_groups).scatter_add_(1, g, torch.where(valid, size, 0))
    src = state.source * valid[..., None]
    sidx = g[..., None].expand(-1, -1, src.shape[-1])
    source = src.new_zeros(x.shape[0], num_groups, src.shape[-1]).scatter_add_(1, sidx, src)
    return (sums / wsum.clamp_min(1e-12)[..., None]).to(x.dtype), new_size, source


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("left_out", [False, True])
def test_merges_are_three_scatters_bit_for_bit(weighted, dtype, left_out):
    """The merges scatter through the flattened batch (and ``merge_every_token`` sums tokens,
    weights and sizes in one scatter-add, written straight into its source rows), for speed;
    they must give exactly the tokens, sizes and source map of three plain scatter-adds in token
    order, with and without left-out tokens (group -1: DiffRate's pruned ones, FATR's kept
    ones), and empty groups (a zero token of size 0). ``merge_every_token`` takes no left-out
    tokens."""
    from helpers import hand_state

    from methods.tokens import merge_every_token, merge_groups

    g = torch.Generator().manual_seed(5)
    size = torch.randint(1, 5, (3, 23), generator=g).float()
    state = hand_state(torch.randn(3, 23, 16, generator=g).to(dtype), num_prefix=2, size=size)
    group = torch.randint(0, 11, (3, 23), generator=g)
    if left_out:
        group = torch.where(torch.rand(3, 23, generator=g) < 0.3, -1, group)
    group = torch.where(group == 10, -1 if left_out else 9, group)  # group 10 stays empty
    weight = torch.rand(3, 23, generator=g) if weighted else None
    want = _three_scatter_merge(state, group, 11, weight=weight)
    merges = [merge_groups] if left_out else [merge_groups, merge_every_token]
    for merge in merges:
        got = merge(state, group, 11, weight=weight)
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(want[1][:, 10], torch.zeros(3)) and not want[0][:, 10].any()


def test_merge_every_token_keeps_gradients():
    """Fine-tuning merges tokens that need gradients: the merge that writes the weighted tokens
    straight into the scatter's source (``out=``, no autograd) must not be the one taken then,
    and both ways give the same tokens."""
    from helpers import hand_state

    from methods.tokens import merge_every_token

    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 9, 4, generator=g)
    group = torch.randint(0, 5, (2, 9), generator=g)
    weight = torch.rand(2, 9, generator=g)
    with torch.no_grad():
        want = merge_every_token(hand_state(x, num_prefix=1), group, 5, weight=weight)[0]
    leaf = x.clone().requires_grad_()
    got = merge_every_token(hand_state(leaf, num_prefix=1), group, 5, weight=weight)[0]
    assert torch.equal(got.detach(), want)
    got.sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.long])
def test_row_gather_and_scatter_add_are_torchs_bit_for_bit(batch, dtype):
    """``batch_gather`` and ``batch_scatter_add`` copy and add whole rows through the flattened
    batch (one ``index_select`` / ``index_add_``) for speed; the values must be exactly what
    ``gather`` / ``scatter_add_`` with the index expanded over the channels give, at batch 1
    (no offsets) and above, for token rows, 2-D tables and matrices."""
    from methods.tokens import batch_gather, batch_scatter_add

    g = torch.Generator().manual_seed(batch)
    for shape in [(batch, 23), (batch, 23, 16), (batch, 23, 4, 5)]:
        t = (torch.randn(shape, generator=g) * 100).to(dtype)
        idx = torch.randint(0, 23, (batch, 9), generator=g)
        view = idx.reshape(idx.shape + (1,) * (t.dim() - 2)).expand(idx.shape + t.shape[2:])
        assert torch.equal(batch_gather(t, idx), t.gather(1, view))
        out = torch.randn((batch, 7) + shape[2:], generator=g).to(dtype)
        group = torch.randint(0, 7, (batch, 23), generator=g)
        want = out.clone().scatter_add_(1, group.reshape(group.shape + (1,) * (t.dim() - 2)).expand(t.shape), t)
        got = batch_scatter_add(out.clone(), group, t)
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_head_mean_is_means_bits_on_the_attentions_key_layout(dtype):
    """The merging methods' metric, ``head_mean(keys)``, adds the heads one by one above a
    size (faster on the CPU); it must be ``keys.mean(dim=1)`` bit for bit, on the strided view
    of the qkv output the patch hands over, for 1 to 6 and 12 heads of several widths, below
    and above the size where it switches, and with values of very different magnitudes."""
    from methods.tokens import head_mean

    g = torch.Generator().manual_seed(3)
    cases = [(1, 197, 3, 64), (8, 197, 3, 64), (6, 197, 4, 16), (2, 600, 2, 8), (3, 401, 3, 40), (2, 50, 1, 64)]
    cases += [(6, 197, 6, 64), (6, 197, 6, 16), (6, 197, 12, 64)]  # more heads: mean itself
    for batch, tokens, heads, width in cases:
        scale = 10.0 ** torch.randint(-3, 4, (1,), generator=g).item()
        qkv = (torch.randn(batch, tokens, 3 * heads * width, generator=g) * scale).to(dtype)
        keys = qkv.reshape(batch, tokens, 3, heads, width).permute(2, 0, 3, 1, 4)[1]
        got = head_mean(keys)
        assert got.dtype == dtype and torch.equal(got, keys.mean(dim=1)), (batch, tokens, heads, width)


def test_class_token_logits_of_an_image_do_not_depend_on_its_batch():
    """The class token's attention row, which EViT, top-k, DiffRate, ATS and PPT rank tokens
    by: from the same queries and keys (views of one qkv output, as the patch has them), each
    image's logits in a batch are the bits it gets alone, and they are ``q₀·kᵀ`` (the keys'
    rows are copied first, so ``kᵀ`` keeps its batch-1 layout; through ``matmul``'s own copy
    of ``kᵀ`` the row rounded differently in a batch). DeiT-T/S/B head counts, several token
    counts, batches up to 64."""
    from methods.attention import class_token_logits

    g = torch.Generator().manual_seed(5)
    for heads, tokens, batch in [(3, 197, 6), (3, 120, 64), (3, 61, 2), (6, 197, 8), (12, 197, 4)]:
        qkv = torch.randn(batch, tokens, 3 * heads * 64, generator=g)
        q, k, _ = qkv.reshape(batch, tokens, 3, heads, 64).permute(2, 0, 3, 1, 4).unbind(0)
        got = class_token_logits(q, k, 0.125)
        assert torch.allclose(got, (q[:, :, :1] * 0.125) @ k.transpose(-2, -1), rtol=1e-5, atol=1e-6)
        for i in range(batch):
            alone = class_token_logits(q[i : i + 1], k[i : i + 1], 0.125)
            assert torch.equal(got[i], alone[0]), (heads, tokens, batch, i)


def test_row_gather_and_scatter_add_compile_to_the_same_values():
    """Under ``torch.compile`` the two helpers take the expanded ``gather`` / ``scatter_add_``
    (which inductor fuses) instead of the flat ops: one graph, and the eager values."""
    from methods.tokens import batch_gather, batch_scatter_add

    def both(t, idx, out, group):
        return batch_gather(t, idx), batch_scatter_add(out, group, t)

    g = torch.Generator().manual_seed(7)
    t, out = torch.randn(3, 23, 16, generator=g), torch.randn(3, 7, 16, generator=g)
    idx, group = torch.randint(0, 23, (3, 9), generator=g), torch.randint(0, 7, (3, 23), generator=g)
    want = both(t, idx, out.clone(), group)
    got = torch.compile(both, fullgraph=True)(t, idx, out.clone(), group)
    assert torch.equal(got[0], want[0])
    assert torch.allclose(got[1], want[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("prefix", [0, 1, 2, 3, 5])
def test_tome_prefix_slots_come_first_in_token_order(prefix):
    """The prefix permutation is derived from shapes alone (no host-device sync on a GPU); it
    must still put every image's prefix tokens, in order, in the first slots."""
    g = torch.Generator().manual_seed(prefix)
    metric = torch.randn(4, 23, 6, generator=g)
    for r in (1, 5, (23 - prefix) // 2):
        group, n_out = bipartite_groups(metric, r, prefix)
        assert n_out == 23 - r
        assert torch.equal(group[:, :prefix], torch.arange(prefix).expand(4, -1))
        assert not torch.isin(group[:, prefix:], torch.arange(prefix)).any()  # never merged into
        assert all(len(set(row.tolist())) == n_out for row in group)  # every slot used


def test_evit_fused_token_is_attention_weighted_sum(images):
    model = tiny_vit()
    _, steps, _ = run_capturing(model, build_reducer("evit", blocks=[2], keep_rate=0.5), images)
    ((_, before, after),) = steps
    score = before.cls_attn.mean(1)[:, 1:]
    kept = math.ceil(0.5 * 64)
    order = score.argsort(-1, descending=True)
    rest = order[:, kept:] + 1
    w = score.gather(1, order[:, kept:])
    expect = (before.x.gather(1, rest[..., None].expand(-1, -1, 48)) * w[..., None]).sum(1)
    assert after.num_tokens == 1 + kept + 1
    assert torch.allclose(after.x[:, -1], expect, atol=1e-6)
    top = order[:, :kept].sort(-1).values + 1
    assert torch.equal(after.x[:, 1:-1], before.x.gather(1, top[..., None].expand(-1, -1, 48)))


def test_tome_schedules():
    assert tome_schedule(13, 12) == [13] * 12
    assert tome_schedule([1, 2], 4) == [1, 2, 0, 0]
    assert sum(tome_schedule(7.5, 12)) == 90
    s = tome_schedule(8, 12, inflection=0.5)
    assert s[0] == 4 and s[-1] == 12 and s == sorted(s)


def test_clear_errors():
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(BenchError, match="cannot build method 'evit': keep_rate must be in"):
            build_reducer("evit", keep_rate=bad)
    with pytest.raises(BenchError, match="r must be >= 0"):
        build_reducer("tome", r=-1)
    with pytest.raises(ReducerConfigError, match="outside the model's depth: valid blocks are 0..5"):
        apply_reducer(tiny_vit(), build_reducer("evit", blocks=[3, 6]))
    with pytest.raises(UnsupportedModelError, match="needs a timm VisionTransformer"):
        apply_reducer(timm.create_model("resnet10t", num_classes=3), build_reducer("none"))
    with pytest.raises(BenchError, match="cannot build method 'tome': .*keep_rate"):
        build_reducer("tome", keep_rate=0.5)
    with pytest.raises(BenchError, match="needs a 'reducer' with a '_target_' class"):
        build_reducer_from_config(OmegaConf.create({"name": "x", "reducer": {"r": 8}}))
    with pytest.raises(BenchError, match="torch.nn.Identity is not a TokenReducer subclass"):
        build_reducer_from_config(OmegaConf.create({"name": "x", "reducer": {"_target_": "torch.nn.Identity"}}))


class DropLastHalf(TokenReducer):
    """A user's reducer, defined here and not in the project: keeps the first half of the tokens."""

    def __init__(self, block: int = 2) -> None:
        super().__init__(block=block)
        self.block = block

    def reduces_at(self, block):
        return block == self.block

    def reduce(self, state, block):
        from methods.tokens import keep_tokens

        n = state.num_tokens
        keep = torch.arange(state.num_prefix + (n - state.num_prefix) // 2, device=state.x.device)
        return keep_tokens(state, keep.expand(state.x.shape[0], -1))


def test_user_reducer_plugs_in_with_one_class(images):
    from hydra.utils import instantiate

    reducer = instantiate({"_target_": f"{__name__}.DropLastHalf", "block": 1})
    _, _, ctx = run_capturing(tiny_vit(), reducer, images)
    assert ctx.token_trace == [65, 33, 33, 33, 33, 33]

    method = OmegaConf.create({"name": "drop_last_half", "reducer": {"_target_": f"{__name__}.DropLastHalf"}})
    _, _, ctx = run_capturing(tiny_vit(), build_reducer_from_config(method), images)  # as bench.run builds it
    assert ctx.token_trace == [65, 65, 33, 33, 33, 33]


@pytest.mark.parametrize(
    "name,kw,explicit_blocks",
    [
        ("none", {}, 0),
        ("tome", {"r": 4}, 0),
        ("evit", {"blocks": [1, 3]}, 0),
        ("fatr", {"blocks": [1, 3], "dc_grid": [2, 1]}, 2),
    ],
)
def test_explicit_attention_maps_only_where_a_reducer_needs_them(monkeypatch, images, name, kw, explicit_blocks):
    """Blocks stay on fused SDPA unless their reducer asks for the full map (memory at high res)."""
    import torch.nn.functional as F

    import methods.attention as attention

    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_vit()
    apply_reducer(model, build_reducer(name, **kw))
    with torch.no_grad():
        model(images)
    assert len(calls) == len(model.blocks) - explicit_blocks


def test_observers_add_needs_and_remove_only_their_own(images):
    from methods import ATTN, KEYS, reduction_context

    model = apply_reducer(tiny_vit(), build_reducer("evit", blocks=[1, 3]))  # EViT itself reads CLS_ATTN only
    ctx = reduction_context(model)
    seen: list[tuple[str, bool, bool]] = []

    def tool(name):
        return lambda block, before, after: seen.append((name, before.attn is not None, before.keys is not None))

    a = ctx.observe(tool("a"), needs={ATTN})
    b = ctx.observe(tool("b"), needs={KEYS})
    with torch.no_grad():
        model(images)
    assert seen == [("a", True, True), ("b", True, True)] * 2, "each tool gets its tap, neither clobbers the other"

    a.remove()
    assert ctx.extra_needs == {KEYS} and ctx.observers == (b.callback,)
    seen.clear()
    with torch.no_grad():
        model(images)
    assert seen == [("b", False, True)] * 2, "removing one tool leaves the other's tap"

    b.remove()
    assert ctx.extra_needs == frozenset() and ctx.observers == ()
    with pytest.raises(ValueError, match="unknown needs"):
        ctx.observe(needs={"logits"})


def test_values_tap_is_the_blocks_values(images):
    """The VALUES tap hands the reducer exactly the values the block's attention used."""
    from methods import VALUES, reduction_context

    model = apply_reducer(tiny_vit(), build_reducer("evit", blocks=[1]))
    seen = []
    reduction_context(model).observe(lambda block, before, after: seen.append(before.values), needs={VALUES})
    captured = {}
    blk = model.blocks[1]
    hook = blk.attn.qkv.register_forward_hook(lambda m, a, out: captured.setdefault("qkv", out))
    with torch.no_grad():
        model(images)
    hook.remove()
    b, n, _ = captured["qkv"].shape
    h, d = blk.attn.num_heads, blk.attn.head_dim
    v = captured["qkv"].reshape(b, n, 3, h, d)[:, :, 2].transpose(1, 2)
    assert len(seen) == 1 and torch.equal(seen[0], v)


class EmptyLastSlot(TokenReducer):
    """Test reducer: empties the last patch slot (size 0, garbage values) at ``block``; with
    ``flag`` it says so (``may_have_empty``), as a per-image-count reducer must."""

    def __init__(self, block: int = 1, flag: bool = True, prop_attn: bool = False) -> None:
        super().__init__(block=block, flag=flag, prop_attn=prop_attn)
        self.block, self.flag = block, flag

    def reduces_at(self, block: int) -> bool:
        return block == self.block

    def reduce(self, state, block):
        size = state.size.clone()
        size[:, -1] = 0
        x = state.x.clone()
        x[:, -1] = 1e4  # an empty slot's content must not matter
        return state.replace(x=x, size=size, reduced=True, may_have_empty=self.flag)


class DropLastSlot(TokenReducer):
    def __init__(self, block: int = 1) -> None:
        super().__init__(block=block, prop_attn=False)
        self.block = block

    def reduces_at(self, block: int) -> bool:
        return block == self.block

    def reduce(self, state, block):
        from methods.tokens import keep_tokens

        idx = torch.arange(state.num_tokens - 1, device=state.x.device).expand(state.x.shape[0], -1)
        return keep_tokens(state, idx)


@pytest.mark.parametrize("prop_attn", [False, True])
def test_empty_slots_are_masked_out_of_attention(images, prop_attn):
    """A flagged empty slot changes nothing later blocks compute for the class token: the same
    logits as dropping the slot; unflagged (and without proportional attention) it would leak."""
    with torch.no_grad():
        dropped = apply_reducer(tiny_vit(), DropLastSlot())(images)
        empty = apply_reducer(tiny_vit(), EmptyLastSlot(prop_attn=prop_attn))(images)
        leaky = apply_reducer(tiny_vit(), EmptyLastSlot(flag=False))(images)
    torch.testing.assert_close(empty, dropped, rtol=1e-4, atol=1e-4)
    assert (leaky - dropped).abs().max() > 1e-3


def test_token_state_replace_is_dataclasses_replace():
    """The fast copy gives what ``dataclasses.replace`` gives: every field carried over (the
    ``extra`` dict shared, as there), the changed ones replaced, an unknown name refused."""
    import dataclasses

    from methods.base import TokenState
    from methods.tokens import initial_state

    state = initial_state(torch.randn(2, 5, 3), 1, (2, 2), trace_source=True)
    state.extra["k"] = 1
    x = torch.zeros(2, 5, 3)
    got, want = state.replace(x=x, reduced=True), dataclasses.replace(state, x=x, reduced=True)
    for f in dataclasses.fields(state):
        assert getattr(got, f.name) is getattr(want, f.name), f.name
    assert got is not state and state.x is not x and not state.reduced
    with pytest.raises(TypeError, match="TokenState has no field"):
        state.replace(tokens=x)

    @dataclasses.dataclass
    class Tagged(TokenState):
        tag: str = ""

    tagged = Tagged(**{f.name: getattr(state, f.name) for f in dataclasses.fields(state)}, tag="a")
    retagged = tagged.replace(tag="b", x=x)
    assert type(retagged) is Tagged and retagged.tag == "b" and retagged.x is x and tagged.tag == "a"


@pytest.mark.parametrize("num_prefix", [0, 1, 2, 3])
def test_prefix_edges_are_masked_and_nothing_else(num_prefix):
    """Prefix tokens alternate into A (even) and B (odd): ``ceil(p/2)`` A rows and
    ``floor(p/2)`` B columns become -inf, every other edge keeps its score."""
    scores = torch.rand(2, 5, 4)
    got = mask_prefix_edges(scores.clone(), num_prefix)
    masked = torch.zeros(5, 4, dtype=torch.bool)
    masked[: (num_prefix + 1) // 2] = True
    masked[:, : num_prefix // 2] = True
    assert torch.isneginf(got[:, masked]).all()
    assert torch.equal(got[:, ~masked], scores[:, ~masked])
