"""Any block list means any block list: plain tensors of any rank route through every
head kind; text's padding is declared (``Masked``), never guessed from a shape; a block
returning something else is refused at build time, naming the block."""

import pytest
import torch
from helpers import vit_blocks
from torch import nn

import locallearn as ll
from locallearn.layers import SequencePool
from locallearn.objectives.heads import HEAD_KINDS
from locallearn.types import Masked, detach


class Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple:
        return x, x


@pytest.mark.parametrize("head", HEAD_KINDS)
def test_a_vit_like_stack_of_plain_tensors_trains_with_every_head_kind(head, tmp_path):
    data = ll.load_data("digits")
    net = ll.LocalNet.from_blocks(vit_blocks(), data.input_shape, data.num_classes, k=2,
                                  head=head)
    cfg = ll.load_config(overrides=["engine=local", "train.epochs=1", "data.train_subset=128",
                                    "data.test_subset=64", "train.progress=false",
                                    "train.checkpoint=false"])
    summary = ll.Trainer(net, data, cfg).fit()
    assert summary["final_acc"] is not None and len(summary["stage_acc"]) == 2


def test_plain_tokens_pool_over_every_token_and_masked_ones_over_real_tokens():
    h = torch.tensor([[[1.0], [3.0], [8.0]]])
    assert SequencePool("mean")(h).tolist() == [[4.0]]
    assert SequencePool("mean")(Masked(h, torch.tensor([[True, True, False]]))).tolist() == [[2.0]]
    assert SequencePool("last")(h).tolist() == [[8.0]]


def test_detach_keeps_a_masked_sequence_masked():
    a = Masked(torch.randn(2, 3, 4, requires_grad=True), torch.ones(2, 3, dtype=torch.bool))
    out = detach(a)
    assert isinstance(out, Masked) and not out.h.requires_grad and out.mask.dtype == torch.bool


def test_a_block_returning_a_plain_tuple_is_refused_at_build_time_naming_it():
    blocks = [nn.Sequential(nn.Flatten(), nn.Linear(64, 8)), Pair(), nn.Linear(8, 8)]
    with pytest.raises(ValueError, match=r"block 1 \(Pair\) returns a tuple of 2.*Masked"):
        ll.LocalNet.from_blocks(blocks, (1, 8, 8), 10, k=2)
