"""The vision transformer: a patch embedding and encoder layers as blocks of (B, N, D) tokens."""

import math

import pytest
import torch
from helpers import assert_pipeline_equals_sequential
from presets import run_preset

from locallearn.engines import LocalEngine
from locallearn.models import build_model
from locallearn.network import LocalNet


def _vit(pool: str = "mean", depth: int = 3):
    return build_model("vit", (3, 16, 16), 10, dim=16, depth=depth, heads=2, patch=4, pool=pool)


def test_blocks_are_the_patch_embedding_then_one_encoder_layer_each():
    b = _vit("cls")
    assert len(b) == 4 and b.shapes[1:] == [(17, 16)] * 4  # 16 patches + CLS, D = 16
    assert isinstance(b.blocks[1], torch.nn.TransformerEncoderLayer) and b.blocks[1].norm_first
    assert _vit("mean").shapes[1] == (16, 16) and _vit().head_options == {"pool": "mean"}
    with pytest.raises(ValueError, match="patch"):
        build_model("vit", (3, 10, 10), 10, patch=4)
    with pytest.raises(ValueError, match="pool"):
        build_model("vit", (3, 16, 16), 10, pool="max")


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_the_task_head_pools_the_tokens(pool):
    net = LocalNet.from_backbone(_vit(pool), 1)
    net.eval()
    x = torch.randn(3, 3, 16, 16)
    tokens = net.stages[0].body(x)
    linear = [m for m in net.stages[0].objective.modules() if isinstance(m, torch.nn.Linear)][-1]
    pooled = tokens.mean(1) if pool == "mean" else tokens[:, 0]
    torch.testing.assert_close(net(x), linear(pooled))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_local_training_works_for_every_k_up_to_the_number_of_layers(k):
    torch.manual_seed(0)
    net = LocalNet.from_backbone(_vit(), k, head="linear")
    opts = [torch.optim.AdamW(s.parameters(), lr=1e-3) for s in net.stages]
    losses = LocalEngine().step(net, opts, torch.randn(4, 3, 16, 16), torch.arange(4))
    assert net.k == k and all(math.isfinite(v) for v in losses)


def test_pipeline_equals_the_sequential_engine():
    torch.manual_seed(0)
    net = LocalNet.from_backbone(_vit(), 3, head="linear")
    # SGD: the received tokens differ from the local ones in float rounding only (~1e-8, the
    # attention kernel's summation order), which Adam would magnify on near-zero gradients
    assert_pipeline_equals_sequential(net, 3, lambda p: torch.optim.SGD(p, lr=0.1),
                                      (4, 3, 16, 16), 10, rtol=1e-5, atol=1e-6)


def test_the_preset_trains_for_an_epoch(tmp_path):
    summary = run_preset("vit_cifar10_local", tmp_path,
                         "model.options={dim: 16, depth: 2, heads: 2, patch: 4}")
    assert summary["k"] == 3 and math.isfinite(summary["final_acc"])
