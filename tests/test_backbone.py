"""Backbones and FPN: parity with the official code (parity README §1, §2) and hand-built references."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from divergen.backbone import (
    FPN,
    FrozenBatchNorm2d,
    PatchMerging,
    ResNetTrunk,
    SwinTransformer,
    SwinTransformerBlock,
    relative_position_index,
    shifted_window_mask,
)

from .conftest import assert_close_rel, strip_prefix

TINY_SWIN = dict(
    embed_dim=24, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=12, drop_path_rate=0.0
)


# ---------------------------------------------------------------------------------------------------------
# Swin: parity with the official BSGAL SwinTransformer (parity README §2)
# ---------------------------------------------------------------------------------------------------------


def _tiny_swin(swin_weights, *, fused: bool) -> SwinTransformer:
    model = SwinTransformer(**TINY_SWIN, fused_attention=fused).eval()
    # strict: the fixture lacks only relative_position_index, which is a non-persistent buffer here.
    model.load_state_dict(swin_weights, strict=True)
    return model


@pytest.mark.parametrize("fused", [False, True], ids=["explicit", "sdpa"])
def test_swin_parity(swin_weights, swin_case, fused):
    model = _tiny_swin(swin_weights, fused=fused)
    prenorm = {}
    for i, stage in enumerate(model.layers):
        stage.register_forward_hook(lambda _m, _inp, out, i=i: prenorm.__setitem__(i, out[0]))
    with torch.no_grad():
        outs = model(swin_case["input.x"])

    assert len(outs) == 3
    for i in range(4):
        ref = swin_case[f"debug.layers{i}_out_prenorm"]
        assert_close_rel(prenorm[i], ref, rel=1e-5, name=f"layers{i} x_out")
        h, w = swin_case[f"debug.layers{i}_hw"].tolist()
        assert ref.shape[1] == h * w
    for i, out in enumerate(outs, start=1):
        assert_close_rel(out, swin_case[f"output.swin{i}"], rel=1e-5, name=f"swin{i}")
    if not fused:
        # The explicit path keeps the original's operation order; the README reports bit-identical re-runs.
        for i, out in enumerate(outs, start=1):
            assert torch.equal(out, swin_case[f"output.swin{i}"]), f"swin{i} not bit-identical"


def test_swin_relative_position_index_and_loading(swin_weights, swin_case):
    model = _tiny_swin(swin_weights, fused=True)
    ref = swin_case["ref.relative_position_index"]
    attns = [blk.attn for stage in model.layers for blk in stage.blocks]
    assert len(attns) == 8
    for attn in attns:
        assert torch.equal(attn.relative_position_index, ref)
    assert not any(k.endswith("relative_position_index") for k in model.state_dict())

    # Official checkpoints carry the index as a persistent buffer: it must load strictly too ...
    official = dict(swin_weights)
    for i in range(4):
        for j in range(2):
            official[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = ref.clone()
    model.load_state_dict(official, strict=True)
    # ... and a wrong index (another window size) is an error, not silently ignored.
    official["layers.2.blocks.1.attn.relative_position_index"] = ref.flip(0)
    with pytest.raises(RuntimeError, match="relative_position_index"):
        model.load_state_dict(official, strict=True)


def test_relative_position_index_formula():
    ws = 5
    index = relative_position_index(ws)
    for i in range(ws * ws):
        for j in range(ws * ws):
            dh, dw = i // ws - j // ws, i % ws - j % ws
            assert index[i, j] == (dh + ws - 1) * (2 * ws - 1) + (dw + ws - 1)


# ---------------------------------------------------------------------------------------------------------
# Swin: independent slow references
# ---------------------------------------------------------------------------------------------------------


def _naive_block(block: SwinTransformerBlock, x: torch.Tensor, h: int, w: int, *, use_mask: bool = True):
    """One Swin block written as the original describes it, window by window, token pair by token pair.

    Pads the normalised tokens to a multiple of ws, rolls by -shift, then attends inside each window with the
    bias table read at the pair's relative offset and -100 between tokens whose original positions did not
    wrap around the same way (the shifted-window mask), unrolls and crops.
    """
    ws, shift, attn = block.window_size, block.shift_size, block.attn
    heads, c = attn.num_heads, x.shape[-1]
    d = c // heads
    y = F.layer_norm(x, (c,), block.norm1.weight, block.norm1.bias).view(h, w, c)
    hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    y = torch.cat([y, y.new_zeros(hp - h, w, c)], 0)
    y = torch.cat([y, y.new_zeros(hp, wp - w, c)], 1)
    y = torch.roll(y, (-shift, -shift), (0, 1))
    out = torch.zeros_like(y)
    table = attn.relative_position_bias_table
    for wi in range(0, hp, ws):
        for wj in range(0, wp, ws):
            rows = [(r, s) for r in range(wi, wi + ws) for s in range(wj, wj + ws)]
            tok = torch.stack([y[r, s] for r, s in rows])  # (N, C)
            q, k, v = F.linear(tok, attn.qkv.weight, attn.qkv.bias).split(c, dim=-1)
            rel, penalty = [], []
            for ra, sa in rows:
                for rb, sb in rows:
                    rel.append((ra - rb + ws - 1) * (2 * ws - 1) + (sa - sb + ws - 1))
                    wrapped_a = (ra + shift >= hp, sa + shift >= wp)
                    wrapped_b = (rb + shift >= hp, sb + shift >= wp)
                    penalty.append(100.0 if use_mask and shift > 0 and wrapped_a != wrapped_b else 0.0)
            n = len(rows)
            logits = table[torch.tensor(rel)].T.reshape(heads, n, n) - torch.tensor(penalty).view(1, n, n)
            for hd in range(heads):
                sl = slice(hd * d, (hd + 1) * d)
                logits[hd] += (q[:, sl] @ k[:, sl].T) * d**-0.5
            mixed = torch.cat(
                [logits[hd].softmax(-1) @ v[:, hd * d : (hd + 1) * d] for hd in range(heads)], -1
            )
            mixed = F.linear(mixed, attn.proj.weight, attn.proj.bias)
            for a, (r, s) in enumerate(rows):
                out[r, s] = mixed[a]
    out = torch.roll(out, (shift, shift), (0, 1))[:h, :w].reshape(1, h * w, c)
    x = x + out
    z = F.layer_norm(x, (c,), block.norm2.weight, block.norm2.bias)
    return x + F.linear(
        F.gelu(F.linear(z, block.mlp.fc1.weight, block.mlp.fc1.bias)),
        block.mlp.fc2.weight,
        block.mlp.fc2.bias,
    )


def _random_block(shift: int, fused: bool) -> SwinTransformerBlock:
    torch.manual_seed(3)
    block = SwinTransformerBlock(dim=16, num_heads=2, window_size=6, shift_size=shift, fused_attention=fused)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5 if p.dim() > 1 else 0.2)  # large enough that attention is far from uniform
        block.attn.relative_position_bias_table.normal_(0, 1)
    return block.eval()


@pytest.mark.parametrize("fused", [False, True], ids=["explicit", "sdpa"])
@pytest.mark.parametrize("shift", [3, 0])
def test_swin_block_matches_naive_windows(shift, fused):
    h, w = 13, 21  # padded to 18 x 24 with window 6: both sides padded, 3 x 4 windows
    block = _random_block(shift, fused)
    x = torch.randn(1, h * w, 16, generator=torch.Generator().manual_seed(5))
    mask = shifted_window_mask(18, 24, 6, 3)
    with torch.no_grad():
        got = block(x, h, w, mask)
        ref = _naive_block(block, x, h, w)
    assert_close_rel(got, ref, rel=1e-5, name=f"block shift={shift}")
    if shift:
        # The mask is not a no-op at this size: the reference without it is far off.
        with torch.no_grad():
            unmasked = _naive_block(block, x, h, w, use_mask=False)
        assert (unmasked - ref).abs().max() > 1e-2


def test_swin_block_fused_gradients_match_explicit():
    # Training goes through the fused path: the bias table must get the same gradient through attn_mask.
    explicit, fused = _random_block(3, fused=False).train(), _random_block(3, fused=True).train()
    x = torch.randn(2, 13 * 21, 16, generator=torch.Generator().manual_seed(7))
    weight = torch.randn(2, 13 * 21, 16, generator=torch.Generator().manual_seed(8))
    mask = shifted_window_mask(18, 24, 6, 3)
    for block in (explicit, fused):
        (block(x, 13, 21, mask) * weight).sum().backward()
    for (name, p_e), p_f in zip(explicit.named_parameters(), fused.parameters(), strict=True):
        assert_close_rel(p_f.grad, p_e.grad, rel=1e-5, name=f"grad {name}")


def test_shifted_window_mask_single_window():
    # Stage 3 of the parity case: 7 x 11 tokens padded to one 12 x 12 window, still shifted by 6 and masked.
    mask = shifted_window_mask(12, 12, 12, 6)
    assert mask.shape == (1, 144, 144)
    r, s = torch.arange(144) // 12, torch.arange(144) % 12
    group = (r >= 6).long() * 2 + (s >= 6).long()
    expected = torch.where(group[:, None] == group[None, :], 0.0, -100.0)
    assert torch.equal(mask[0], expected)


def test_patch_merging_odd_size_order():
    torch.manual_seed(0)
    merge = PatchMerging(dim=3)
    with torch.no_grad():
        merge.norm.weight.uniform_(0.5, 1.5)
        merge.norm.bias.normal_()
    h, w, c = 3, 5, 3
    x = torch.randn(2, h * w, c)
    with torch.no_grad():
        got = merge(x, h, w)
    grid = x.view(2, h, w, c)

    def at(i, j):
        return grid[:, i, j] if i < h and j < w else torch.zeros(2, c)

    rows = []
    for i in range(0, h + 1, 2):
        for j in range(0, w + 1, 2):
            # (row, col) offsets (0,0), (1,0), (0,1), (1,1): the original's x0, x1, x2, x3
            rows.append(torch.cat([at(i, j), at(i + 1, j), at(i, j + 1), at(i + 1, j + 1)], -1))
    ref = torch.stack(rows, 1)
    ref = F.linear(F.layer_norm(ref, (4 * c,), merge.norm.weight, merge.norm.bias), merge.reduction.weight)
    assert got.shape == (2, 2 * 3, 2 * c)
    assert_close_rel(got, ref, rel=1e-6, name="patch merging")


def test_swin_shapes_batch_and_fused_consistency():
    torch.manual_seed(0)
    model = SwinTransformer(**TINY_SWIN).eval()
    x = torch.randn(2, 3, 70, 102)  # not a multiple of the patch size: 18 x 26 -> 9x13 -> 5x7 -> 3x4
    with torch.no_grad():
        outs = model(x)
        single = model(x[1:])
        model_explicit = SwinTransformer(**TINY_SWIN, fused_attention=False).eval()
        model_explicit.load_state_dict(model.state_dict())
        explicit = model_explicit(x)
    assert model.out_channels == [48, 96, 192] and model.strides == [8, 16, 32]
    assert [tuple(o.shape) for o in outs] == [(2, 48, 9, 13), (2, 96, 5, 7), (2, 192, 3, 4)]
    for i, (a, b, e) in enumerate(zip(outs, single, explicit, strict=True)):
        assert_close_rel(a[1:], b, rel=1e-5, name=f"batched vs single, out {i}")
        assert_close_rel(a, e, rel=1e-5, name=f"sdpa vs explicit, out {i}")


def test_swin_large_layout():
    with torch.device("meta"):
        model = SwinTransformer()  # Swin-L, 22k-384, as BSGAL_SwinL.yaml
    keys = model.state_dict()
    # centernet2.md §5: 355 official trunk keys, 24 of them relative_position_index (not persisted here).
    assert len(keys) == 355 - 24
    assert sum(p.numel() for p in model.parameters()) == 195_200_820  # + 54.0 M heads = the spec's 249.2 M
    assert keys["patch_embed.proj.weight"].shape == (192, 3, 4, 4)
    assert keys["layers.2.blocks.17.attn.relative_position_bias_table"].shape == (529, 24)
    assert keys["layers.2.downsample.reduction.weight"].shape == (1536, 3072)
    assert "layers.3.downsample.reduction.weight" not in keys
    assert [keys[f"norm{i}.weight"].shape[0] for i in (1, 2, 3)] == model.out_channels == [384, 768, 1536]
    rates = [
        blk.drop_path.drop_prob if blk.drop_path.__class__.__name__ == "DropPath" else 0.0
        for stage in model.layers
        for blk in stage.blocks
    ]
    assert rates == pytest.approx([0.3 * i / 23 for i in range(24)])


# ---------------------------------------------------------------------------------------------------------
# FPN (centernet2.md §1.3)
# ---------------------------------------------------------------------------------------------------------


def test_fpn_parity(heads_weights, heads_case):
    fpn = FPN(torch.nn.Identity(), in_channels=[512, 1024, 2048])
    fpn.load_state_dict(strip_prefix(heads_weights, "backbone."), strict=True)
    with torch.no_grad():
        outs = fpn.fuse([heads_case[f"input.bottom_up.layer{i}"] for i in (3, 4, 5)])
    assert len(outs) == 5
    # The README reaches bit-identity with 2 threads; other thread counts change the conv reduction order.
    for level, out in zip(range(3, 8), outs, strict=True):
        assert_close_rel(out, heads_case[f"fpn.p{level}"], rel=1e-5, name=f"p{level}")


def _up2(x: torch.Tensor) -> torch.Tensor:
    return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


def test_fpn_top_down_and_p6_from_p5_output():
    torch.manual_seed(0)
    fpn = FPN(torch.nn.Identity(), in_channels=[8, 16, 32], out_channels=12)
    with torch.no_grad():
        for p in fpn.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.5)  # c2_xavier_fill zeroes the biases; make them count
    c3, c4, c5 = torch.randn(1, 8, 12, 20), torch.randn(1, 16, 6, 10), torch.randn(1, 32, 3, 5)
    with torch.no_grad():
        p3, p4, p5, p6, p7 = fpn.fuse([c3, c4, c5])
        top5 = fpn.fpn_lateral5(c5)
        top4 = fpn.fpn_lateral4(c4) + _up2(top5)
        top3 = fpn.fpn_lateral3(c3) + _up2(top4)
        ref = [fpn.fpn_output3(top3), fpn.fpn_output4(top4), fpn.fpn_output5(top5)]
        ref6 = F.conv2d(ref[2], fpn.top_block.p6.weight, fpn.top_block.p6.bias, stride=2, padding=1)
        ref7 = F.conv2d(F.relu(ref6), fpn.top_block.p7.weight, fpn.top_block.p7.bias, stride=2, padding=1)
        from_lateral5 = fpn.top_block.p6(top5)  # what a P6 on the pre-output map would give
    for name, got, exp in zip(
        ("p3", "p4", "p5", "p6", "p7"), (p3, p4, p5, p6, p7), (*ref, ref6, ref7), strict=True
    ):
        assert_close_rel(got, exp, rel=1e-6, name=name)
    # P6 must read the P5 output: the pre-output map gives something else (and C5, 32 channels, cannot run).
    assert (from_lateral5 - p6).abs().max() > 1e-2


def test_fpn_shapes_on_padded_non_square_input():
    torch.manual_seed(0)
    fpn = FPN(ResNetTrunk(name="resnet18"), in_channels=[128, 256, 512]).eval()
    x = torch.randn(1, 3, 96, 160)  # multiples of 32, not square
    with torch.no_grad():
        outs = fpn(x)
        fused = fpn.fuse(fpn.bottom_up(x))
    assert FPN.strides == fpn.strides == [8, 16, 32, 64, 128] and fpn.size_divisibility == 32
    assert [tuple(o.shape) for o in outs] == [(1, 256, 96 // s, math.ceil(160 / s)) for s in (8, 16, 32)] + [
        (1, 256, 2, 3),
        (1, 256, 1, 2),
    ]
    for a, b in zip(outs, fused, strict=True):
        assert torch.equal(a, b)


def test_fpn_rejects_unpadded_input():
    fpn = FPN(torch.nn.Identity(), in_channels=[4, 4, 4], out_channels=4)
    with pytest.raises(ValueError, match="multiple of 32"):
        fpn.fuse([torch.randn(1, 4, 13, 13), torch.randn(1, 4, 7, 7), torch.randn(1, 4, 4, 4)])


def test_fpn_c2_xavier_init():
    torch.manual_seed(0)
    fpn = FPN(torch.nn.Identity(), in_channels=[512, 1024, 2048])
    for name, conv in [
        ("fpn_lateral5", fpn.fpn_lateral5),
        ("fpn_output3", fpn.fpn_output3),
        ("p6", fpn.top_block.p6),
    ]:
        fan_in = conv.weight[0].numel()
        bound = math.sqrt(3.0 / fan_in)  # kaiming_uniform a=1: gain 1, bound sqrt(3 / fan_in)
        assert torch.all(conv.bias == 0), name
        assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound, name


# ---------------------------------------------------------------------------------------------------------
# ResNet trunk (centernet2.md §1.1, §5)
# ---------------------------------------------------------------------------------------------------------


def _official_r50_trunk_keys() -> set[str]:
    """centernet2.md §5: ``backbone.bottom_up.base.*`` keys of the official R50, without ``fc``."""
    bn = ("weight", "bias", "running_mean", "running_var")
    keys = {"conv1.weight"} | {f"bn1.{b}" for b in bn}
    for layer, blocks in enumerate((3, 4, 6, 3), start=1):
        for i in range(blocks):
            for j in (1, 2, 3):
                keys.add(f"layer{layer}.{i}.conv{j}.weight")
                keys |= {f"layer{layer}.{i}.bn{j}.{b}" for b in bn}
        keys.add(f"layer{layer}.0.downsample.0.weight")
        keys |= {f"layer{layer}.0.downsample.1.{b}" for b in bn}
    return {f"base.{k}" for k in keys}


def test_resnet50_trunk_keys_frozen_bn_and_shapes():
    torch.manual_seed(0)
    trunk = ResNetTrunk(name="resnet50")
    state = trunk.state_dict()
    expected = _official_r50_trunk_keys()
    assert len(expected) == 265  # the spec's 267 keys minus fc.{weight,bias}
    assert set(state) == expected
    buffers = {n for n, _ in trunk.named_buffers()}
    assert len(buffers) == 212  # every BN tensor, all frozen: no num_batches_tracked
    assert all(".bn" in n or "bn1." in n or "downsample.1." in n for n in buffers)
    params = dict(trunk.named_parameters())
    assert len(params) == 53 and all(p.dim() == 4 for p in params.values())  # conv weights only
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in trunk.modules())

    assert trunk.out_channels == [512, 1024, 2048] and trunk.strides == [8, 16, 32]
    with torch.no_grad():
        feats = trunk(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 512, 8, 12), (1, 1024, 4, 6), (1, 2048, 2, 3)]


def test_resnet_trunk_equals_timm_in_eval_and_stays_frozen():
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(2, 3, 4))
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    trunk = ResNetTrunk(name="resnet18")
    assert trunk.out_channels == [128, 256, 512]
    # timm state dicts (with num_batches_tracked) load strictly.
    trunk.base.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    ref.eval()
    trunk.train()  # frozen BN ignores the mode: train == eval, statistics untouched
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    with torch.no_grad():
        expected, got = ref(x), trunk(x)
    for a, b in zip(got, expected, strict=True):
        assert_close_rel(a, b, rel=1e-5, name="frozen trunk vs timm eval")
    assert all(torch.equal(before[k], v) for k, v in trunk.state_dict().items())


def test_frozen_batchnorm_formula():
    bn = FrozenBatchNorm2d(4)
    assert not list(bn.parameters())
    x = torch.randn(2, 4, 3, 5)
    assert torch.allclose(bn(x), x, atol=1e-6)  # fresh = identity (running_var = 1 - eps)
    bn.weight.copy_(torch.tensor([1.0, 2.0, -1.0, 0.5]))
    bn.bias.copy_(torch.tensor([0.0, 1.0, 2.0, -3.0]))
    bn.running_mean.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 9.0]))
    ref = (x - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-5)
    ref = ref * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    assert_close_rel(bn(x), ref, rel=1e-6, name="frozen bn")
    assert bn(x.half()).dtype == torch.half


def test_resnet_residual_branches_start_alive():
    """A frozen BN cannot learn its way out of timm's zero-initialised last BN: those weights must start at 1."""
    trunk = ResNetTrunk(name="resnet18")
    last_bns = [block.bn2 for layer in (trunk.base.layer1, trunk.base.layer4) for block in layer]
    assert all(torch.equal(bn.weight, torch.ones_like(bn.weight)) for bn in last_bns)
