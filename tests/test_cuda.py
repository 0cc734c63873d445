"""On a CUDA GPU: the precision modes, device-resident data, and the pipeline on the GPU.

Every test here is marked ``cuda`` and skipped, with the reason, where no GPU is
present (run them alone with ``pytest -m cuda``; ``benchmarks/gpu/run.sh`` does). The
pipeline runs on NCCL across two GPUs when there are two, else as two processes
sharing one GPU over gloo (NCCL refuses two ranks on one device), and must train the
weights of the sequential engine on the same GPU.
"""

from pathlib import Path

import pytest
import torch

from locallearn import precision, runs
from locallearn.config import load_config
from locallearn.data.core import batches, load_data, place_data
from locallearn.engines import LocalEngine
from locallearn.engines.base import StageUpdate
from locallearn.measure import LossTally, StageClock
from locallearn.models import build_model
from locallearn.network import LocalNet
from locallearn.train import run

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(GPUS == 0, reason="no CUDA GPU on this machine")]
TINY = ["model=mlp", "model.options={hidden: [32, 32, 32, 32]}", "data.train_subset=256",
        "data.test_subset=64", "data.batch_size=32", "optim.lr=0.1", "train.progress=false",
        "engine.threads=1", "engine.timeout=60", "train.epochs=1", "split.k=4"]


def conv_net() -> LocalNet:
    torch.manual_seed(0)
    net = LocalNet.from_backbone(build_model("resnet20", (3, 8, 8), 10, width=0.25), 2,
                                 head="0c1f")
    return net.cuda()


def test_auto_picks_bf16_on_a_gpu_that_has_it(monkeypatch):
    monkeypatch.delenv(precision.AUTO_ENV, raising=False)
    choice = precision.resolve("auto", "auto", "false", "cuda")
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert choice.precision == expected and choice.channels_last == (expected == "bf16")


@pytest.mark.parametrize("mode", ["fp32", "bf16", "fp16"])
def test_every_precision_trains_a_stage_on_the_gpu(mode):
    choice = precision.resolve(mode, "true", "false", "cuda")
    net = precision.prepare(conv_net(), choice)
    opts = [torch.optim.SGD(s.parameters(), lr=0.05, momentum=0.9) for s in net.stages]
    engine = LocalEngine(update=StageUpdate(choice))
    x = engine.update.input(torch.randn(16, 3, 8, 8, device="cuda"))
    y = torch.randint(0, 10, (16,), device="cuda")
    with engine.update.autocast():
        out = net.stages[0](x)
    assert out.dtype == choice.dtype
    losses = [engine.step(net, opts, x, y) for _ in range(3)][-1]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert (mode == "fp16") == bool(engine.update.scalers)


def test_compiled_stages_train_on_the_gpu():
    choice = precision.resolve("bf16", "true", "true", "cuda")
    net = precision.prepare(conv_net(), choice)
    opts = [torch.optim.SGD(s.parameters(), lr=0.05) for s in net.stages]
    engine = LocalEngine(update=StageUpdate(choice))
    x, y = torch.randn(16, 3, 8, 8, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    losses = engine.step(net, opts, engine.update.input(x), y)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_the_data_set_lives_on_the_gpu_when_asked_or_when_it_fits():
    data = load_data("digits")
    for on_device in ("true", "auto"):
        placed = place_data(data, "cuda", on_device)
        assert placed.train.x.is_cuda and placed.test.y.is_cuda
        x, y = next(batches(placed.train, 32, shuffle=True, generator=torch.Generator(),
                            device="cuda", mean=data.meta["mean"], std=data.meta["std"]))
        assert x.is_cuda and y.is_cuda and x.dtype == torch.float32
    host = place_data(data, "cuda", "false")
    assert not host.train.x.is_cuda
    x, _ = next(batches(host.train, 32, shuffle=False, generator=None, device="cuda"))
    assert x.is_cuda  # copied through pinned memory


def test_losses_and_stage_times_are_read_once_without_a_sync_per_step():
    clock, tally = StageClock("cuda"), LossTally(2)
    a = torch.randn(256, 256, device="cuda")
    for _ in range(3):
        with clock.time(0):
            loss = (a @ a).mean()
        tally.add(0, loss)
    assert clock.seconds()[0] > 0 and tally.read()[0] == pytest.approx(float((a @ a).mean()),
                                                                        rel=1e-4)


def _weights(run_dir: Path) -> dict:
    return runs.load_checkpoint(run_dir)["net"]


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_the_pipeline_on_the_gpu_trains_the_weights_of_the_sequential_engine(tmp_path, mode):
    if GPUS >= 2:
        placement = ["engine.devices=[cuda:0, cuda:1]", "engine.backend=nccl"]
    else:  # NCCL refuses two ranks on one GPU: the ranks share it over gloo
        placement = ["engine.devices=[cuda:0]", "engine.backend=gloo"]
    common = [*TINY, f"train.out_dir={tmp_path}", f"train.precision={mode}"]
    _, pipe = run(load_config(None, [*common, "train.name=pipe", "engine=pipeline",
                                     "engine.workers=2", *placement]))
    _, local = run(load_config(None, [*common, "train.name=local", "engine=local",
                                      "engine.device=cuda:0"]))
    wa, wb = _weights(pipe), _weights(local)
    assert list(wa) == list(wb)
    for name in wa:
        torch.testing.assert_close(wa[name].cpu(), wb[name].cpu(), rtol=1e-5, atol=1e-6, msg=name)
