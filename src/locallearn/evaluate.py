"""Evaluation: accuracy of every stage's predictor, the final output and head ensembles.

Ensembles average the softmax of every stage that can predict, uniformly or with
stage k weighted by 2^k (deeper stages count more), normalised.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch

from locallearn.groups import GroupAccuracy
from locallearn.models.blocks import Activation
from locallearn.network import LocalNet


@torch.no_grad()
def evaluate(net: LocalNet, batches: Iterable[tuple[Activation, torch.Tensor]]) -> dict[str, Any]:
    """Test accuracy (%) of each stage, the final stage and the two ensembles.

    Returns:
        ``{"stage_acc": [...], "final_acc", "ens_uniform", "ens_weighted", "n"}``;
        a stage that cannot predict has accuracy ``None``. Nets with width groups also
        get ``"group_acc"``: per stage, the accuracy of every group head (``None`` for
        stages without groups).
    """
    was = net.training
    net.eval()
    correct = torch.zeros(net.k)
    can_predict = [True] * net.k
    ens: dict[str, float] = {"ens_uniform": 0, "ens_weighted": 0}
    n = 0
    groups = GroupAccuracy(net)
    for x, y in batches:
        outputs: list[Activation] = []
        logits = net.stage_logits(x, outputs=outputs)
        if groups.any:
            groups.update(outputs, y)
        probs = []
        for k, lg in enumerate(logits):
            if lg is None:
                can_predict[k] = False
                continue
            correct[k] += (lg.argmax(1) == y).sum().item()
            probs.append((k, lg.softmax(1)))
        for key, weight in (("ens_uniform", lambda k: 1.0), ("ens_weighted", lambda k: 2.0 ** k)):
            if not probs:  # no stage can predict (a self-supervised net): no ensemble
                break
            total = sum(weight(k) for k, _ in probs)
            avg = cast(torch.Tensor, sum(weight(k) * p for k, p in probs) / total)  # probs: tensors
            ens[key] += (avg.argmax(1) == y).sum().item()
        n += len(y)
    net.train(was)
    acc = [100.0 * c.item() / max(n, 1) if ok else None for c, ok in zip(correct, can_predict)]
    result = {"stage_acc": acc, "final_acc": acc[-1], "n": n,
              **{k: 100.0 * v / max(n, 1) if any(can_predict) else None for k, v in ens.items()}}
    if groups.any:
        result["group_acc"] = groups.result()
    return result
