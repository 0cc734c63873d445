"""A vision transformer for small images as a block list: patch embedding, then one block per layer.

Block 0 cuts the image into ``patch`` x ``patch`` patches, embeds each linearly (a strided
conv), adds a learned position embedding and, with ``pool=cls``, prepends a CLS token.
Each further block is one ``nn.TransformerEncoderLayer`` (pre-norm, GELU, batch first); the
last also applies the final LayerNorm of a pre-norm transformer. Every block outputs
plain ``(B, N, D)`` token tensors, so a split may cut after any layer (K = 2 .. depth + 1)
and every head pools the tokens first (``mean`` or ``cls``: the task head takes the model's
``pool``; the heads of earlier stages take ``objective.options.pool``, default ``mean``).

Sizes for 32x32 images (patch 4: 64 tokens): the defaults (dim 192, depth 6, 3 heads,
MLP ratio 2) are a ViT-Tiny-like net of about 1.8M parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from locallearn.models.blocks import Backbone, infer_shapes, register_model
from locallearn.models.layers import check_image_shape

POOLS = ("mean", "cls")


class PatchEmbedding(nn.Module):
    """Image (B, C, H, W) -> tokens (B, N, D): patches, linear embedding, position, CLS."""

    def __init__(self, channels: int, dim: int, patch: int, num_patches: int, cls: bool) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if cls else None
        self.pos = nn.Parameter(torch.randn(1, num_patches + int(cls), dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.proj(x).flatten(2).transpose(1, 2)
        if self.cls is not None:
            t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1)
        return t + self.pos


@register_model("vit", help="vision transformer: patch embedding + one block per encoder layer")
def vit(input_shape: tuple[int, ...], num_classes: int, *, dim: int = 192, depth: int = 6,
        heads: int = 3, patch: int = 4, mlp_ratio: float = 2.0, pool: str = "mean",
        dropout: float = 0.0) -> Backbone:
    """A ViT for (C, H, W) images; task head: pool the tokens, then linear.

    Args:
        input_shape: (C, H, W); H and W must be multiples of ``patch``.
        num_classes: number of classes.
        dim: embedding size D (a multiple of ``heads``).
        depth: number of encoder layers.
        heads: attention heads per layer.
        patch: patch size.
        mlp_ratio: hidden size of each layer's MLP, in multiples of D.
        pool: ``mean`` (of all tokens) or ``cls`` (a CLS token).
        dropout: dropout inside the encoder layers.

    Raises:
        ValueError: for a non-image shape, a size not divisible by ``patch``, D not
            divisible by ``heads``, or an unknown pool.
    """
    c, h, w = check_image_shape("vit", input_shape)
    if pool not in POOLS:
        raise ValueError(f"vit pool={pool!r}; choose one of: {', '.join(POOLS)}")
    if h % patch or w % patch:
        raise ValueError(f"vit patch={patch} must divide the image size {h}x{w}")
    if dim % heads:
        raise ValueError(f"vit dim={dim} must be a multiple of heads={heads}")
    blocks: list[nn.Module] = [PatchEmbedding(c, dim, patch, (h // patch) * (w // patch),
                                              pool == "cls")]
    for i in range(depth):
        layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        blocks.append(nn.Sequential(layer, nn.LayerNorm(dim)) if i == depth - 1 else layer)
    return Backbone(name="vit", blocks=blocks, shapes=infer_shapes(blocks, input_shape),
                    num_classes=num_classes, head="linear", head_options={"pool": pool})
