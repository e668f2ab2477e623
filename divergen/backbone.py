"""Backbones of CenterNet2 (ResNet-50 with frozen BN, the original Swin transformer) and its FPN P3-P7.

Everything follows reference/centernet2.md §1 (architecture) and §5 (state-dict names): the parameter and
buffer names here are the official ones, so an official checkpoint loads after stripping a prefix:

- ``backbone.bottom_up.base.<timm ResNet names>`` -> :class:`ResNetTrunk`
- ``backbone.bottom_up.<Swin names>``             -> :class:`SwinTransformer`
- ``backbone.fpn_*``, ``backbone.top_block.*``    -> :class:`FPN` (with the trunk as ``bottom_up``)

Feature maps are ``(B, C, H, W)``; C3/C4/C5 (and swin1/2/3) have strides 8/16/32, P3-P7 strides 8-128.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------------------
# ResNet-50 trunk (centernet2.md §1.1)
# ---------------------------------------------------------------------------------------------------------


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine terms, as detectron2's ``FrozenBatchNorm2d``.

    ``weight``, ``bias``, ``running_mean`` and ``running_var`` are buffers, so the BN affine terms are not
    trained (centernet2.md §1.1, ``TIMM.NORM=FrozenBN``) and there is no ``num_batches_tracked``.
    y = x · w/√(var + eps) + (b − mean · w/√(var + eps)).

    Arguments:
        num_features: number of channels C of the ``(B, C, H, W)`` input.
        eps: added to the variance (detectron2 and BatchNorm2d default 1e-5).
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        # 1 - eps, as detectron2: a freshly built frozen BN is then exactly the identity.
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        # Cast to the input dtype as detectron2 does, so a half-precision trunk stays half precision. One fused
        # multiply-add instead of x * scale + bias: one pass over the activations fewer, forward and backward.
        return torch.addcmul(bias.to(x.dtype).view(1, -1, 1, 1), x, scale.to(x.dtype).view(1, -1, 1, 1))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # timm / torchvision ImageNet weights carry BatchNorm2d's counter; it has no meaning for a frozen BN.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Replace every BatchNorm in ``module`` (recursively) by a frozen copy; returns the new root."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            frozen = cls(module.num_features, eps=module.eps)
            if module.affine:
                frozen.weight.copy_(module.weight.detach())
                frozen.bias.copy_(module.bias.detach())
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
            return frozen
        for name, child in module.named_children():
            new_child = cls.convert(child)
            if new_child is not child:
                setattr(module, name, new_child)
        return module


class ResNetTrunk(nn.Module):
    """timm ResNet features C3, C4, C5 (strides 8/16/32) with every BatchNorm frozen (centernet2.md §1.1).

    The official wrapper names these features ``layer3/4/5``, but they are timm's ``layer2/3/4`` outputs
    (``out_indices=(2, 3, 4)`` of [stem, layer1, ..., layer4]). Convolutions stay trainable (``FREEZE_AT=0``).
    State-dict keys: ``base.conv1.weight``, ``base.bn1.{weight,bias,running_mean,running_var}``,
    ``base.layer{1-4}.{i}.*`` — the official ``backbone.bottom_up.base.*`` keys without the unused ``fc``.

    Arguments:
        name: timm model name; "resnet50" for the papers' R50, "resnet18" for tiny test configs.
    """

    def __init__(self, *, name: str = "resnet50"):
        super().__init__()
        # zero_init_last=False: timm zero-initialises each block's last BN weight, and a frozen BN would keep it at
        # 0 forever, so every residual branch of a model trained from scratch would stay dead. Pretrained weights
        # overwrite these values anyway.
        base = timm.create_model(
            name, pretrained=False, features_only=True, out_indices=(2, 3, 4), zero_init_last=False
        )
        self.out_channels: list[int] = list(base.feature_info.channels())
        self.strides: list[int] = list(base.feature_info.reduction())
        self.base = FrozenBatchNorm2d.convert(base)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(B, 3, H, W)`` normalised image -> [C3, C4, C5], ``(B, C_i, H/s_i, W/s_i)`` for s = 8, 16, 32."""
        return list(self.base(x))


# ---------------------------------------------------------------------------------------------------------
# Swin transformer, the original "Swin-Transformer-Object-Detection" code (centernet2.md §1.2)
# ---------------------------------------------------------------------------------------------------------


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """``(B, H, W, C)`` with H, W multiples of ``window_size`` -> ``(B·nW, ws, ws, C)``, windows row-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, c)


def window_reverse(windows: Tensor, window_size: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B·nW, ws, ws, C)`` -> ``(B, H, W, C)``."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window_size, width // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, height, width, c)


def relative_position_index(window_size: int) -> Tensor:
    """``(ws², ws²)`` int64: row of the ``((2ws-1)², heads)`` bias table for each (query, key) pair.

    For tokens at (h_i, w_i) and (h_j, w_j): (h_i − h_j + ws − 1)·(2ws − 1) + (w_i − w_j + ws − 1) (Swin §3.2,
    "relative position bias").
    """
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)  # (2, ws²)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)  # (ws², ws², 2)
    return rel[..., 0] * (2 * window_size - 1) + rel[..., 1]


def shifted_window_mask(height: int, width: int, window_size: int, shift_size: int, device=None) -> Tensor:
    """``(nW, ws², ws²)`` additive mask of the shifted windows, built on the padded ``height × width`` grid.

    After the cyclic roll by −shift, a window at the bottom/right edge holds tokens from up to 4 regions that
    are not adjacent in the image; pairs from different regions get −100, which softmax turns into ≈0
    (Swin §3.2, "efficient batch computation for shifted configuration"; the original uses −100, not −inf).
    ``height`` and ``width`` must be multiples of ``window_size``.
    """

    def region(n: int) -> Tensor:
        # The original's slices (0, -ws), (-ws, -shift), (-shift, None) along one axis -> region 0, 1, 2.
        idx = torch.arange(n, device=device)
        return (idx >= n - window_size).long() + (idx >= n - shift_size).long()

    img = (region(height)[:, None] * 3 + region(width)[None, :]).float()  # (Hp, Wp)
    windows = window_partition(img[None, :, :, None], window_size).reshape(-1, window_size * window_size)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear (the transformer feed-forward; keys ``fc1``, ``fc2``).

    Arguments:
        dim: input and output width.
        hidden_dim: width of the hidden layer (mlp_ratio · dim).
    """

    def __init__(self, *, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ws×ws windows with a relative position bias (Swin §3.2).

    Attention logits = (q·scale)kᵀ + B[relative_position_index] (+ shift mask), scale = head_dim^−0.5.
    ``relative_position_index`` is a **non-persistent** buffer: it is a fixed function of ``window_size``,
    our state dicts do not carry it, and the parity weights omit it. The official checkpoints do carry it
    (a persistent buffer there), so :meth:`_load_from_state_dict` accepts the key when present, checks that
    it equals ours and drops it; loading stays ``strict=True`` both with and without it.

    Arguments:
        dim: token width C.
        window_size: side ws of the square windows.
        num_heads: attention heads; C must be divisible by it.
        qkv_bias: whether the qkv projection has a bias (True in every official config).
        fused: use ``F.scaled_dot_product_attention`` with bias + mask as an additive ``attn_mask``, so
            PyTorch may pick a fused kernel that takes such a mask (CPU: ~2x faster here; matches the
            original to ~1e-6 relative). False runs the original's explicit softmax(qkᵀ + B + M)v,
            bit-identical to the official code.
    """

    def __init__(
        self, *, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True, fused: bool = True
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"WindowAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.fused = fused
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size), persistent=False
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "relative_position_index"
        if key in state_dict:
            given = state_dict.pop(key)
            if not torch.equal(given.to(self.relative_position_index), self.relative_position_index):
                errors.append(
                    f"{key}: the checkpoint's index differs from that of window_size {self.window_size}"
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def relative_position_bias(self) -> Tensor:
        """``(heads, ws², ws²)``: the bias table gathered for every (query, key) pair of a window."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(B·nW, N, C)`` window tokens (N = ws²), ``mask`` ``(nW, N, N)`` or None -> ``(B·nW, N, C)``.

        Windows are ordered image-major (as :func:`window_partition`), so window w of every image gets
        ``mask[w]``.
        """
        bw, n, c = x.shape
        heads, d = self.num_heads, c // self.num_heads
        qkv = self.qkv(x).reshape(bw, n, 3, heads, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B·nW, heads, N, d)
        if self.fused:
            bias = self.relative_position_bias().unsqueeze(0)  # (1, heads, N, N)
            if mask is None:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale)
            else:
                # Fold the windows into the head axis, (B, nW·heads, N, d), so that one (1, nW·heads, N, N)
                # bias + mask broadcasts over the images instead of being repeated B times.
                nw = mask.shape[0]
                attn_mask = (bias + mask.unsqueeze(1)).reshape(1, nw * heads, n, n).to(q.dtype)
                q, k, v = (t.reshape(bw // nw, nw * heads, n, d) for t in (q, k, v))
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
            return self.proj(out.reshape(bw, heads, n, d).transpose(1, 2).reshape(bw, n, c))
        # The original's operation order (scale q, then qk^T, + bias, + mask): bit-identical outputs.
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + self.relative_position_bias().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(bw, heads, n, n)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj(x)


class SwinTransformerBlock(nn.Module):
    """One Swin block: x + W-MSA(LN(x)), then x + MLP(LN(x)); odd blocks use shifted windows (Swin §3.1).

    The original detection code **pads, then shifts**: the normalised tokens are zero-padded right/bottom
    to a multiple of ws, rolled by −shift, attended per window (padded tokens are attended to, not masked),
    rolled back and cropped (centernet2.md §1.2; timm 1.0 rolls before padding, which differs).

    Arguments:
        dim: token width C.
        num_heads: attention heads.
        window_size: window side ws.
        shift_size: cyclic shift (0 or ws // 2).
        mlp_ratio: hidden width of the MLP relative to C.
        qkv_bias: bias of the qkv projection.
        drop_path: stochastic-depth rate of both residual branches.
        fused_attention: see :class:`WindowAttention` ``fused``.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        fused_attention: bool = True,
    ):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size={window_size}), got {shift_size}")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(
            dim=dim, window_size=window_size, num_heads=num_heads, qkv_bias=qkv_bias, fused=fused_attention
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim=dim, hidden_dim=int(dim * mlp_ratio))

    def forward(self, x: Tensor, height: int, width: int, mask: Tensor | None) -> Tensor:
        """``(B, H·W, C)`` row-major tokens of an ``height × width`` map -> same shape.

        ``mask``: the ``(nW, ws², ws²)`` shift mask of the padded grid (used only if ``shift_size > 0``).
        """
        b, length, c = x.shape
        if length != height * width:
            raise ValueError(f"SwinTransformerBlock: {length} tokens for a {height}x{width} map")
        ws = self.window_size
        shortcut = x
        x = self.norm1(x).view(b, height, width, c)
        pad_r, pad_b = (ws - width % ws) % ws, (ws - height % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = height + pad_b, width + pad_r
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = window_partition(x, ws).view(-1, ws * ws, c)
        windows = self.attn(windows, mask=mask if self.shift_size > 0 else None)
        x = window_reverse(windows.view(-1, ws, ws, c), ws, hp, wp)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = x[:, :height, :width, :].reshape(b, height * width, c)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2×2 token merging: ``(B, H·W, C)`` -> ``(B, ⌈H/2⌉·⌈W/2⌉, 2C)`` (Swin §3.1, "patch merging").

    Odd sizes are zero-padded right/bottom; the four sub-grids are concatenated in the order
    (0::2, 0::2), (1::2, 0::2), (0::2, 1::2), (1::2, 1::2) (rows, cols), then LayerNorm(4C), Linear(4C → 2C)
    without bias — this order decides which input rows of ``reduction.weight`` see which pixel.

    Arguments:
        dim: input width C.
    """

    def __init__(self, *, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        b, _, c = x.shape
        x = x.view(b, height, width, c)
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """A Swin stage (the original's ``BasicLayer``): ``depth`` blocks, alternately regular and shifted,
    then an optional :class:`PatchMerging` (``downsample``) at its **end**.

    Arguments:
        dim: token width C of the stage.
        depth: number of blocks.
        num_heads: attention heads.
        window_size: window side ws; odd blocks shift by ws // 2.
        mlp_ratio: MLP hidden width relative to C.
        qkv_bias: bias of the qkv projections.
        drop_path: per-block stochastic-depth rates, length ``depth``.
        downsample: whether the stage ends with a PatchMerging.
        fused_attention: see :class:`WindowAttention` ``fused``.
    """

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: Sequence[float] = (),
        downsample: bool = False,
        fused_attention: bool = True,
    ):
        super().__init__()
        drop_path = list(drop_path) or [0.0] * depth
        if len(drop_path) != depth:
            raise ValueError(f"SwinStage: {len(drop_path)} drop_path rates for depth {depth}")
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim=dim,
                num_heads=num_heads,
                window_size=window_size,
                shift_size=0 if i % 2 == 0 else self.shift_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=drop_path[i],
                fused_attention=fused_attention,
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim=dim) if downsample else None

    def forward(self, x: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, int, int]:
        """``(B, H·W, C)`` -> (x_out ``(B, H·W, C)`` before merging, x_down ``(B, H'·W', 2C)``, H', W').

        Without a downsample, x_down is x_out and (H', W') = (H, W).
        """
        ws = self.window_size
        hp, wp = -(-height // ws) * ws, -(-width // ws) * ws
        mask = shifted_window_mask(hp, wp, ws, self.shift_size, device=x.device).to(x.dtype)
        for block in self.blocks:
            x = block(x, height, width, mask)
        if self.downsample is None:
            return x, x, height, width
        return x, self.downsample(x, height, width), (height + 1) // 2, (width + 1) // 2


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches -> C-dim tokens: Conv2d(3, C, p, stride p) + LayerNorm (``patch_norm``).

    The input is zero-padded right/bottom to a multiple of p first, as in the original.

    Arguments:
        patch_size: patch side p (4).
        embed_dim: token width C.
        in_chans: image channels.
    """

    def __init__(self, *, patch_size: int = 4, embed_dim: int = 96, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        """``(B, 3, H, W)`` -> (tokens ``(B, h·w, C)`` row-major, h, w), with h = ⌈H/p⌉ and w = ⌈W/p⌉."""
        p = self.patch_size
        x = F.pad(x, (0, (p - x.shape[-1] % p) % p, 0, (p - x.shape[-2] % p) % p))
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class SwinTransformer(nn.Module):
    """The original Swin backbone (Swin-Transformer-Object-Detection, BSGAL's ``swintransformer.py``).

    patch_embed -> 4 stages of C, 2C, 4C, 8C channels (strides 4, 8, 16, 32), PatchMerging at the end of
    stages 0-2. For i in ``out_indices`` the output is stage i's tokens *before* its PatchMerging, through
    the detection-only LayerNorm ``norm{i}``, as ``(B, C_i, H_i, W_i)`` (centernet2.md §1.2). The defaults
    are Swin-L (22k, 384, window 12) as BSGAL/DiverGen use it. Keys: ``patch_embed.*``,
    ``layers.{i}.blocks.{j}.*``, ``layers.{0,1,2}.downsample.*``, ``norm{i}.*`` — the official
    ``backbone.bottom_up.*`` names.

    Arguments:
        embed_dim: width C of stage 0.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: window side ws.
        mlp_ratio: MLP hidden width relative to the token width.
        drop_path_rate: stochastic depth, linearly increasing from 0 to this over all blocks.
        patch_size: patch side of the embedding (4).
        out_indices: stages whose outputs are returned (1, 2, 3 -> strides 8, 16, 32).
        fused_attention: window attention through ``F.scaled_dot_product_attention`` (faster, leaner;
            ~1e-6 relative to the official code) or, if False, the original explicit form (bit-identical).
    """

    def __init__(
        self,
        *,
        embed_dim: int = 192,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (6, 12, 24, 48),
        window_size: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.3,
        patch_size: int = 4,
        out_indices: Sequence[int] = (1, 2, 3),
        fused_attention: bool = True,
    ):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"SwinTransformer: {len(depths)} depths but {len(num_heads)} num_heads")
        num_stages = len(depths)
        if any(not 0 <= i < num_stages for i in out_indices):
            raise ValueError(f"SwinTransformer: out_indices {tuple(out_indices)} outside 0..{num_stages - 1}")
        self.out_indices = tuple(out_indices)
        self.num_features = [embed_dim * 2**i for i in range(num_stages)]
        self.out_channels: list[int] = [self.num_features[i] for i in self.out_indices]
        self.strides: list[int] = [patch_size * 2**i for i in self.out_indices]
        self.patch_embed = PatchEmbed(patch_size=patch_size, embed_dim=embed_dim)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        starts = [sum(depths[:i]) for i in range(num_stages + 1)]
        self.layers = nn.ModuleList(
            SwinStage(
                dim=self.num_features[i],
                depth=depths[i],
                num_heads=num_heads[i],
                window_size=window_size,
                mlp_ratio=mlp_ratio,
                drop_path=dpr[starts[i] : starts[i + 1]],
                downsample=i < num_stages - 1,
                fused_attention=fused_attention,
            )
            for i in range(num_stages)
        )
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.apply(_swin_init)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(B, 3, H, W)`` normalised image -> [swin_i for i in out_indices], each ``(B, C_i, H_i, W_i)``.

        Sizes round up at each step (patch padding, then PatchMerging padding), e.g. 200×328 -> 25×41 (s8).
        """
        x, h, w = self.patch_embed(x)
        outs = []
        # Every stage runs, also past the last out index, as in the original (its parameters exist anyway).
        for i, stage in enumerate(self.layers):
            x_out, x, h_next, w_next = stage(x, h, w)
            if i in self.out_indices:
                x_out = getattr(self, f"norm{i}")(x_out)
                outs.append(x_out.view(-1, h, w, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
            h, w = h_next, w_next
        return outs


def _swin_init(module: nn.Module) -> None:
    """The original ``init_weights``: Linear ~ trunc_normal(0.02), bias 0; LayerNorm weight 1, bias 0."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------------------
# FPN P3-P7 (centernet2.md §1.3)
# ---------------------------------------------------------------------------------------------------------


def c2_xavier_fill(module: nn.Module) -> None:
    """detectron2's ``c2_xavier_fill`` (Caffe2 "XavierFill"): weight ~ kaiming_uniform(a=1), bias 0."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class LastLevelP6P7(nn.Module):
    """P6 = Conv3×3/2(P5), P7 = Conv3×3/2(ReLU(P6)), where P5 is the FPN **output** P5, not C5
    (detectron2/CenterNet2 ``LastLevelP6P7_P5``; centernet2.md §1.3).

    Arguments:
        channels: width of P5, P6 and P7 (256).
    """

    def __init__(self, *, channels: int = 256):
        super().__init__()
        self.p6 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        c2_xavier_fill(self.p6)
        c2_xavier_fill(self.p7)

    def forward(self, p5: Tensor) -> list[Tensor]:
        """``(B, C, H, W)`` P5 -> [P6 ``(B, C, ⌈H/2⌉, ⌈W/2⌉)``, P7 ``(B, C, ⌈H/4⌉', ⌈W/4⌉')``]."""
        p6 = self.p6(p5)
        return [p6, self.p7(F.relu(p6))]


class FPN(nn.Module):
    """Feature pyramid P3-P7 on a bottom-up trunk with features C3, C4, C5 (FPN §3; centernet2.md §1.3).

    Lateral 1×1 and output 3×3 convs with bias (no norm), named by log2(stride); top-down path: nearest ×2
    upsampling summed with the lateral; P6/P7 from :class:`LastLevelP6P7`. The input must be padded to a
    multiple of ``size_divisibility`` so that every upsampled map matches the next lateral.

    Arguments:
        bottom_up: module mapping ``(B, 3, H, W)`` to [C3, C4, C5] (``ResNetTrunk`` or ``SwinTransformer``).
        in_channels: channels of C3, C4, C5.
        out_channels: width of every pyramid level (256).
    """

    size_divisibility: int = 32
    strides: list[int] = [8, 16, 32, 64, 128]

    def __init__(self, bottom_up: nn.Module, *, in_channels: Sequence[int], out_channels: int = 256):
        super().__init__()
        if len(in_channels) != 3:
            raise ValueError(f"FPN expects the channels of C3, C4, C5, got {list(in_channels)}")
        self.bottom_up = bottom_up
        self.out_channels = out_channels
        for level, c in zip((3, 4, 5), in_channels, strict=True):
            lateral = nn.Conv2d(c, out_channels, 1)
            output = nn.Conv2d(out_channels, out_channels, 3, padding=1)
            c2_xavier_fill(lateral)
            c2_xavier_fill(output)
            self.add_module(f"fpn_lateral{level}", lateral)
            self.add_module(f"fpn_output{level}", output)
        self.top_block = LastLevelP6P7(channels=out_channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(B, 3, H, W)`` normalised, padded image -> [P3, P4, P5, P6, P7], ``(B, 256, H/s, W/s)``."""
        return self.fuse(self.bottom_up(x))

    def fuse(self, features: Sequence[Tensor]) -> list[Tensor]:
        """The FPN alone: [C3, C4, C5] -> [P3, P4, P5, P6, P7].

        As detectron2's ``FPN.forward``: prev = lateral5(C5), P5 = output5(prev); then for C4 and C3,
        prev = lateral(C) + upsample×2(prev) and P = output(prev). P6/P7 read P5 (the output, not C5).
        """
        if len(features) != 3:
            raise ValueError(f"FPN.fuse expects [C3, C4, C5], got {len(features)} feature maps")
        c3, c4, c5 = features
        prev = self.fpn_lateral5(c5)
        p5 = self.fpn_output5(prev)
        outs = [p5]
        for c, lateral, output in (
            (c4, self.fpn_lateral4, self.fpn_output4),
            (c3, self.fpn_lateral3, self.fpn_output3),
        ):
            top_down = F.interpolate(prev, scale_factor=2.0, mode="nearest")
            if top_down.shape[-2:] != c.shape[-2:]:
                raise ValueError(
                    f"FPN: upsampled map is {tuple(top_down.shape[-2:])} but the lateral input is "
                    f"{tuple(c.shape[-2:])}; pad the image to a multiple of {self.size_divisibility}"
                )
            prev = lateral(c) + top_down
            outs.insert(0, output(prev))
        return outs + self.top_block(p5)
