"""Text models through every objective and engine: LSTM and Transformer stages.

K=1 local equals BP, local training learns a tiny text data set, padding never reaches
any stage's output, per-stage predictors, SupCon (SCPL) with sequence pooling, early
exit, the pipeline engine, and ``locallearn train`` end to end (vocabulary saved).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import floats

from locallearn.data import load_data
from locallearn.engines import BackpropEngine, LocalEngine
from locallearn.engines.base import detach, stage_loss
from locallearn.layers import SequencePool
from locallearn.models import build_model
from locallearn.network import LocalNet
from locallearn.optim import build_optimizer

torch.set_num_threads(1)

VOCAB, LENGTH, CLASSES = 30, 8, 3
MODELS = {
    "lstm": {"embed_dim": 8, "hidden": 8, "layers": 3},
    "bilstm": {"embed_dim": 8, "hidden": 4, "layers": 3, "bidirectional": True, "pool": "bilast"},
    "transformer": {"dim": 8, "heads": 2, "ff": 16, "layers": 3, "dropout": 0.0},
    "transformer_cls": {"dim": 8, "heads": 2, "ff": 16, "layers": 3, "dropout": 0.0,
                        "cls_token": True, "norm_first": True, "max_len": LENGTH + 4},
}


def _net(key: str, k: int, length: int = LENGTH, **kwargs) -> LocalNet:
    torch.manual_seed(0)
    name = "lstm" if "lstm" in key else "transformer"
    backbone = build_model(name, (length,), CLASSES, vocab_size=VOCAB, **MODELS[key])
    return LocalNet.from_backbone(backbone, k, **kwargs)


def _ids(n: int, g: torch.Generator, length: int = LENGTH) -> torch.Tensor:
    """Right-padded ids with lengths 1..length (token ids from 2: 0 is padding, 1 unknown)."""
    ids = torch.randint(2, VOCAB, (n, length), generator=g)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    ids[torch.arange(length) >= lengths[:, None]] = 0
    return ids


def _train(net: LocalNet, engine, steps: int = 4, lr: float = 1e-2) -> list[list[float]]:
    opts = [build_optimizer(s.parameters(), "adam", lr) for s in net.stages]
    g = torch.Generator().manual_seed(1)
    return [floats(engine.step(net, opts, _ids(12, g), torch.randint(0, CLASSES, (12,), generator=g)))
            for _ in range(steps)]


# --- engines ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["lstm", "transformer"])
def test_k1_local_equals_backprop(key: str) -> None:
    a = _net(key, 1)
    b = copy.deepcopy(a)
    la, lb = _train(a, LocalEngine()), _train(b, BackpropEngine())
    assert sum(la, []) == pytest.approx(sum(lb, []), rel=1e-6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("key", ["lstm", "transformer"])
def test_local_differs_from_backprop_at_k4(key: str) -> None:
    """The equivalence above can fail: with K=4 the updates differ."""
    a = _net(key, 4)
    b = copy.deepcopy(a)
    _train(a, LocalEngine(), steps=2)
    _train(b, BackpropEngine(), steps=2)
    first = zip(a.stages[0].body.parameters(), b.stages[0].body.parameters())
    assert any(not torch.allclose(pa, pb) for pa, pb in first)


def _write_tiny_corpus(root: Path) -> None:
    """A textfolder data set whose class is told by its words."""
    g = torch.Generator().manual_seed(0)
    words = {"pos": ["good", "great", "fine", "nice"], "neg": ["bad", "awful", "poor", "dull"]}
    filler = ["the", "film", "was", "a", "plot", "and", "it"]
    for split, n in (("train", 48), ("test", 16)):
        for cls, own in words.items():
            folder = root / "tiny" / split / cls
            folder.mkdir(parents=True)
            for i in range(n // 2):
                pick = torch.randint(0, 4, (3,), generator=g).tolist()
                fill = torch.randint(0, 7, (int(torch.randint(1, 6, (1,), generator=g)),),
                                     generator=g).tolist()
                text = " ".join([filler[j] for j in fill] + [own[j] for j in pick])
                (folder / f"{i}.txt").write_text(text, encoding="utf-8")


@pytest.mark.parametrize("key", ["lstm", "transformer"])
def test_local_k4_learns_a_tiny_text_data_set(key: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALLEARN_CACHE_DIR", str(tmp_path / "cache"))
    _write_tiny_corpus(tmp_path)
    data = load_data("textfolder", tmp_path, path="tiny", max_len=10)
    torch.manual_seed(0)
    sizes = {**MODELS[key], **({"embed_dim": 16, "hidden": 16} if key == "lstm" else {})}
    backbone = build_model(key, data.input_shape, data.num_classes,
                           vocab_size=data.meta["vocab_size"], **sizes)
    net = LocalNet.from_backbone(backbone, 4)
    opts = [build_optimizer(s.parameters(), "adam", 1e-2) for s in net.stages]
    engine = LocalEngine()
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(12):  # epochs of 3 shuffled batches (the files are sorted by class)
        order = torch.randperm(len(data.train), generator=g).view(3, -1)
        losses += [engine.step(net, opts, data.train.x[i], data.train.y[i]) for i in order]
    first, last = losses[0], losses[-3:]
    for k in range(4):  # every stage's local loss falls
        assert sum(step[k] for step in last) / 3 < 0.5 * first[k]
    net.eval()
    with torch.no_grad():
        acc = (net(data.test.x).argmax(1) == data.test.y).float().mean().item()
    assert acc > 0.75


# --- padding ---------------------------------------------------------------------------


def _garbage_at_padding(h, g: torch.Generator):
    """The activation with random values written at every padded position."""
    x, mask = h
    noise = torch.randn(x.shape, generator=g) * 10
    return torch.where(mask.unsqueeze(-1), x, noise), mask


@pytest.mark.parametrize("key", list(MODELS))
def test_padding_never_changes_any_stage_output(key: str) -> None:
    """Garbage at padded positions of any boundary, and extra padding at the input,
    change no stage's logits (predictors on every stage)."""
    net = _net(key, 4, predictor="linear").eval()
    g = torch.Generator().manual_seed(0)
    ids = _ids(6, g)
    with torch.no_grad():
        reference = net.stage_logits(ids)
        longer = torch.cat([ids, torch.zeros(6, 4, dtype=ids.dtype)], dim=1)
        if key != "transformer":  # the plain Transformer's positions cover LENGTH only
            for a, b in zip(reference, net.stage_logits(longer)):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        h, logits = ids, []
        for stage in net.stages:
            out = stage(h)
            logits.append(stage.predict(_garbage_at_padding(out, g)))
            h = _garbage_at_padding(out, g)
    for a, b in zip(reference, logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_lstm_stages_have_their_cost_counted() -> None:
    """The FLOP counter knows the CPU LSTM kernel: 4H x (in + H) MACs per real token."""
    from locallearn.measure import macs

    net = _net("lstm", 3).eval()  # embedding + LSTM 1 | LSTM 2 | LSTM 3
    ids = _ids(5, torch.Generator().manual_seed(0))
    tokens = int((ids != 0).sum())
    h = net.stages[0](ids)
    assert macs(lambda: net.stages[0].body(ids)) == tokens * 4 * 8 * (8 + 8)
    with torch.no_grad():
        assert macs(lambda: net.stages[1].body(h)) == tokens * 4 * 8 * (8 + 8)


# --- predictors, early exit ------------------------------------------------------------


@pytest.mark.parametrize("key", ["lstm", "transformer"])
def test_per_stage_predictors_on_text_stages(key: str) -> None:
    net = _net(key, 3, predictor="linear")
    assert all(isinstance(s.predictor.head[0], SequencePool) for s in net.stages)
    x, y = _ids(8, torch.Generator().manual_seed(0)), torch.randint(0, CLASSES, (8,))
    assert [lg.shape for lg in net.stage_logits(x)] == [(8, CLASSES)] * 3
    # the predictor's loss trains the predictor, not the body
    stage = net.stages[0]
    without = copy.deepcopy(stage)
    without.predictor = None
    grads = []
    for s in (stage, without):
        s.zero_grad(set_to_none=True)
        stage_loss(s, s(x), y).backward()
        grads.append([p.grad.clone() for p in s.body.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert all(p.grad is not None for p in stage.predictor.parameters())
    before = [p.clone() for p in net.stages[1].predictor.parameters()]
    _train(net, LocalEngine(), steps=1)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.stages[1].predictor.parameters()))


@pytest.mark.parametrize("key", ["lstm", "transformer"])
def test_early_exit_on_text_answers_with_the_exit_stage(key: str) -> None:
    from locallearn.exits import early_exit_predict, forward_shortcut

    net = _net(key, 3, predictor="linear").eval()
    x = _ids(10, torch.Generator().manual_seed(0))
    with torch.no_grad():
        every = net.stage_logits(x)
    torch.testing.assert_close(forward_shortcut(net, x, 2), every[1])
    logits, where = early_exit_predict(net, x, threshold=0.4)
    for i, k in enumerate(where.tolist()):  # each sample's answer is its exit stage's logits
        torch.testing.assert_close(logits[i], every[k - 1][i], rtol=0, atol=1e-5)
    _, where = early_exit_predict(net, x, threshold=0.0)
    assert where.tolist() == [1] * 10


# --- supervised contrastive (SCPL) -----------------------------------------------------


@pytest.mark.parametrize("key", ["lstm", "transformer_cls"])
def test_supcon_pools_sequences_over_the_mask(key: str) -> None:
    from locallearn.objectives.supcon import SupConObjective

    net = _net(key, 3, objective="supcon", predictor="linear",
               objective_options={"proj_dim": 4, "proj_hidden": 8})
    assert all(isinstance(s.objective, SupConObjective) for s in net.stages)
    assert all(isinstance(s.objective.projector[0], SequencePool) for s in net.stages)
    pools = [s.objective.projector[0].mode for s in net.stages]
    assert pools[-1] == net.stages[-1].objective.classifier.head[0].mode  # the model's pool
    net.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        h = net.stages[0](_ids(6, g))
        z = net.stages[0].objective.embed(h)
        torch.testing.assert_close(net.stages[0].objective.embed(_garbage_at_padding(h, g)), z)


@pytest.mark.parametrize("key", ["lstm", "transformer"])
def test_scpl_trains_text_stages_with_local_and_backprop(key: str) -> None:
    opts = {"proj_dim": 4, "proj_hidden": 8}
    net = _net(key, 4, objective="supcon", predictor="linear", objective_options=opts)
    g = torch.Generator().manual_seed(0)
    x, y = _ids(16, g), torch.arange(16) % CLASSES
    optimizers = [build_optimizer(s.parameters(), "adam", 1e-2) for s in net.stages]
    first = LocalEngine().step(net, optimizers, x, y)
    for _ in range(6):
        last = LocalEngine().step(net, optimizers, x, y)
    assert all(math.isfinite(v) for v in first) and sum(last) < sum(first)
    bp = _net(key, 4, objective="supcon", predictor="linear", objective_options=opts)
    losses = _train(bp, BackpropEngine(), steps=2)
    assert all(math.isfinite(v) for v in losses[-1])


# --- pipeline --------------------------------------------------------------------------


def test_pipeline_equals_sequential_for_a_text_model() -> None:
    """Two pipeline ranks in threads, linked by queues: the mask travels with the
    activations and the updates are those of the sequential local engine."""
    pipeline = pytest.importorskip("locallearn.engines.pipeline")
    import queue
    import threading

    from locallearn.distributed import wire

    class Link:  # an in-process Outbox / Inbox: packets go through the wire format
        def __init__(self) -> None:
            self.q: queue.Queue = queue.Queue()
            self.seen: list = []

        def put(self, packet) -> None:
            tensors = wire.encode(packet)
            received = wire.Layout.parse(tensors[0]).packet(tensors[1:])
            self.seen.append(received)
            self.q.put(received)

        def get(self, kind: int):
            packet = self.q.get(timeout=30)
            assert packet.kind == kind
            return packet

    for key in ("lstm", "transformer"):
        seq = _net(key, 4, objective="supcon", predictor="linear",
                   objective_options={"proj_dim": 4, "proj_hidden": 8})
        pipe = copy.deepcopy(seq)
        seq_losses = _train(seq, LocalEngine(), steps=3)
        link = Link()
        ranks = [pipeline.PipelineEngine(range(0, 2), outbox=link),
                 pipeline.PipelineEngine(range(2, 4), inbox=link)]
        opts = [build_optimizer(s.parameters(), "adam", 1e-2) for s in pipe.stages]
        g = torch.Generator().manual_seed(1)
        batches = [(_ids(12, g), torch.randint(0, CLASSES, (12,), generator=g)) for _ in range(3)]
        late: list = []
        worker = threading.Thread(target=lambda: late.extend(
            ranks[1].step(pipe, opts) for _ in batches))
        worker.start()
        early = [ranks[0].step(pipe, opts, x, y) for x, y in batches]
        worker.join(60)
        assert all(p.kind == wire.TRAIN and isinstance(p.h, tuple) and p.h[1].dtype == torch.bool
                   for p in link.seen)  # (hidden, mask) went down the pipeline
        merged = [floats(a[:2] + b[2:]) for a, b in zip(early, late)]
        assert sum(merged, []) == pytest.approx(sum(seq_losses, []), rel=1e-5)
        for pa, pb in zip(seq.parameters(), pipe.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_pipeline_processes_equal_local_on_text(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``engine=pipeline`` with two worker processes trains the same SCPL text net as
    ``engine=local`` (about 40 s: it spawns processes)."""
    from locallearn import runs
    from locallearn.config import load_config
    from locallearn.train import run

    monkeypatch.setenv("LOCALLEARN_CACHE_DIR", str(tmp_path / "cache"))
    _write_tiny_corpus(tmp_path)
    nets = {}
    for engine in ("local", "pipeline"):
        cfg = load_config(None, [
            "data=textfolder", f"data.data_dir={tmp_path}",
            "data.options={path: tiny, max_len: 10}", "data.batch_size=16", "model=lstm",
            "model.options={embed_dim: 8, hidden: 8, layers: 3}", "split.k=4",
            f"engine={engine}", "engine.workers=2", "engine.threads=1", "objective=supcon",
            "objective.predictor=linear", "objective.options={proj_dim: 4, proj_hidden: 8}",
            "optim.name=adam", "optim.lr=0.01", "train.epochs=2", "train.progress=false",
            f"train.out_dir={tmp_path / 'runs'}", f"train.name={engine}"])
        summary, run_dir = run(cfg)
        nets[engine] = runs.load_checkpoint(run_dir)["net"]
    for name, value in nets["local"].items():
        torch.testing.assert_close(nets["pipeline"][name], value, rtol=1e-5, atol=1e-6)


# --- the CLI path ----------------------------------------------------------------------


def test_train_run_on_text_saves_the_vocabulary(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from locallearn.config import load_config
    from locallearn.data.tokenize import encoder_from_dict
    from locallearn.train import run

    monkeypatch.setenv("LOCALLEARN_CACHE_DIR", str(tmp_path / "cache"))
    _write_tiny_corpus(tmp_path)
    cfg = load_config(None, [
        "data=textfolder", f"data.data_dir={tmp_path}", "data.options={path: tiny, max_len: 10}",
        "data.batch_size=16", "model=transformer",
        "model.options={dim: 8, heads: 2, ff: 16, layers: 3, dropout: 0.0}", "split.k=4",
        "engine=local", "objective.predictor=linear", "optim.name=adam", "optim.lr=0.01",
        "train.epochs=1", "train.progress=false", f"train.out_dir={tmp_path / 'runs'}"])
    summary, run_dir = run(cfg)
    assert len(summary["stage_acc"]) == 4 and summary["final_acc"] is not None
    vocab = encoder_from_dict(json.loads((run_dir / "vocab.json").read_text()))
    assert len(vocab) == load_data("textfolder", tmp_path, path="tiny", max_len=10).meta["vocab_size"]
    assert vocab.encode(["good film"], 4)[0, :2].ne(1).all()  # known words, not <unk>


def test_imdb_subsets_hold_both_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """aclImdb files come sorted by class; the loader mixes them so a subset is not one class."""
    monkeypatch.setenv("LOCALLEARN_CACHE_DIR", str(tmp_path / "cache"))
    for split in ("train", "test"):
        for cls in ("neg", "pos"):
            folder = tmp_path / "aclImdb" / split / cls
            folder.mkdir(parents=True)
            for i in range(10):
                (folder / f"{i}_5.txt").write_text(f"{cls} review {i}", encoding="utf-8")
    data = load_data("imdb", tmp_path, max_len=4)
    for part in (data.train, data.test):
        assert sorted(part.y.tolist()) == [0] * 10 + [1] * 10
        assert set(part.y[:6].tolist()) == {0, 1}


def test_detach_cuts_both_tensors_of_a_text_activation() -> None:
    net = _net("lstm", 2)
    h = net.stages[0](_ids(3, torch.Generator().manual_seed(0)))
    cut = detach(h)
    assert isinstance(cut, tuple) and not cut[0].requires_grad and cut[1].dtype == torch.bool
