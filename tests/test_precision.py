"""Reduced precision, channels-last and compilation: what auto picks, and that it is applied.

The pipeline-equals-sequential test in bf16 runs both sides under the same
:class:`~locallearn.precision.PrecisionUpdate` forward context, so the same casts
happen in the same order and the parameters agree bit for bit.
"""

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import Loopback

from locallearn import precision
from locallearn.config import load_config
from locallearn.engines import LocalEngine
from locallearn.engines.base import StageUpdate
from locallearn.engines.pipeline import PipelineEngine, assign_stages
from locallearn.models import build_model
from locallearn.network import LocalNet
from locallearn.objectives.simclr import nt_xent
from locallearn.objectives.supcon import supcon_loss
from locallearn.optim import build_optimizer
from locallearn.precision import Choice, PrecisionUpdate, resolve

torch.set_num_threads(1)
BF16 = Choice("bf16", False, None, "cpu", "test")


@pytest.fixture
def cpu(monkeypatch):
    """Fake this CPU's features: ``cpu(flags)`` makes the flags the only source of truth."""
    monkeypatch.delenv(precision.AUTO_ENV, raising=False)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)

    def fake(flags, vendor="GenuineIntel"):
        monkeypatch.setattr(precision, "cpu_flags", lambda *a: set(flags))
        monkeypatch.setattr(precision, "cpu_vendor", lambda *a: vendor)
    return fake


def conv_net(k: int = 2) -> LocalNet:
    torch.manual_seed(0)
    return LocalNet.from_backbone(build_model("resnet20", (3, 8, 8), 10, width=0.25), k,
                                  head="0c1f")


# -- auto -------------------------------------------------------------------------------------

def test_auto_picks_bf16_and_channels_last_on_a_cpu_with_amx(cpu):
    cpu({"amx_bf16", "avx512f"})
    choice = resolve("auto", "auto", "false", "cpu")
    assert (choice.precision, choice.channels_last, choice.compile) == ("bf16", True, None)
    assert "amx_bf16" in choice.reason


def test_auto_picks_bf16_and_channels_last_on_an_amd_cpu_with_avx512_bf16(cpu):
    cpu({"avx512_bf16", "avx512f"}, vendor="AuthenticAMD")
    choice = resolve("auto", "auto", "false", "cpu")
    assert (choice.precision, choice.channels_last) == ("bf16", True)
    assert "AMD" in choice.reason


def test_an_amd_cpu_without_avx512_bf16_stays_fp32(cpu):
    cpu({"avx2"}, vendor="AuthenticAMD")
    assert resolve("auto", "auto", "false", "cpu").precision == "fp32"


def test_cpu_vendor_reads_vendor_id(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2\n")
    assert precision.cpu_vendor(info) == "AuthenticAMD"
    assert precision.cpu_vendor(tmp_path / "none") == ""


def test_auto_is_fp32_channels_last_on_intel_avx512_bf16_without_amx_where_bf16_measured_slower(cpu):
    cpu({"avx512_bf16", "avx512f"})
    choice = resolve("auto", "auto", "false", "cpu")
    assert (choice.precision, choice.channels_last) == ("fp32", True)
    assert "no faster" in choice.reason


def test_auto_is_fp32_and_contiguous_on_a_cpu_without_avx512(cpu):
    cpu({"avx2", "sse2"})
    choice = resolve("auto", "auto", "false", "cpu")
    assert (choice.precision, choice.channels_last) == ("fp32", False)


def test_torchs_own_capability_check_counts_as_native(cpu, monkeypatch):
    cpu(set())
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert resolve("auto", device="cpu").precision == "bf16"


def test_the_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert {"avx512_bf16", "sse2"} <= precision.cpu_flags(info)
    assert precision.cpu_flags(tmp_path / "missing") == set()


def test_the_environment_pins_auto_to_fp32_but_not_an_explicit_choice(cpu, monkeypatch):
    cpu({"avx512_bf16"})
    monkeypatch.setenv(precision.AUTO_ENV, "fp32")
    assert (resolve("auto", "auto").precision, resolve("auto", "auto").channels_last) == ("fp32", False)
    assert resolve("bf16", "true").precision == "bf16" and resolve("bf16", "true").channels_last


def test_explicit_settings_and_bad_values():
    assert resolve("fp32", "true", "true").compile == "default"
    assert resolve("fp32", True, "max-autotune").compile == "max-autotune"
    assert resolve("fp32", False, False).compile is None
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        resolve("fp16", "false", "false", "cpu")
    with pytest.raises(ValueError, match="train.channels_last"):
        resolve("fp32", "sideways")


def test_the_config_takes_the_keys_from_the_command_line():
    t = load_config(None, ["train.channels_last=true", "train.compile=true",
                           "train.precision=bf16"]).train
    assert (t.precision, t.channels_last, t.compile) == ("bf16", "true", "true")
    assert load_config(None, []).train.precision == "auto"  # the users' default
    with pytest.raises(ValueError, match="train.compile"):
        load_config(None, ["train.compile=fastest"])


def test_describe_records_what_was_chosen():
    d = precision.describe(BF16)
    assert d["precision"] == "bf16" and d["autocast_dtype"] == "bfloat16"
    assert d["channels_last"] is False and d["compile"] == "false" and d["reason"] == "test"
    assert "bf16" in precision.summary_line(BF16)


# -- what the choice does ------------------------------------------------------------------------

def test_bf16_autocast_runs_convolutions_and_matmuls_in_bf16_and_losses_in_fp32():
    net = conv_net()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    with PrecisionUpdate(BF16).autocast():
        out = net.stages[0](x)
        assert out.dtype == torch.bfloat16
        assert torch.nn.Linear(3, 2)(torch.randn(2, 3)).dtype == torch.bfloat16
        assert net.stages[0].objective.loss(out, y).dtype == torch.float32
        z = F.normalize(torch.randn(6, 4), dim=1)
        assert supcon_loss(z, torch.tensor([0, 0, 1, 1, 2, 2])).dtype == torch.float32
        assert nt_xent(z).dtype == torch.float32


def test_contrastive_similarities_are_computed_in_fp32_under_autocast():
    z = F.normalize(torch.randn(8, 16), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    with PrecisionUpdate(BF16).autocast():
        inside = (supcon_loss(z, labels, 0.1), nt_xent(z, 0.5))
    assert torch.equal(inside[0], supcon_loss(z, labels, 0.1))  # not a bf16 matmul
    assert torch.equal(inside[1], nt_xent(z, 0.5))


def test_fp32_is_no_autocast_at_all():
    net = conv_net()
    with PrecisionUpdate().autocast():
        out = net.stages[0](torch.randn(2, 3, 8, 8))
        loss = net.stages[0].objective.loss(out, torch.tensor([1, 2]))
    assert out.dtype == torch.float32 and loss.dtype == torch.float32


def test_channels_last_is_applied_to_the_parameters_and_to_4d_inputs():
    net = precision.prepare(conv_net(), Choice("fp32", True))
    convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    update = PrecisionUpdate(Choice("fp32", True))
    x = update.input(torch.randn(2, 3, 8, 8))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    tokens = torch.randint(0, 5, (2, 7))
    assert update.input(tokens) is tokens
    assert PrecisionUpdate().input(x) is x  # contiguous runs leave inputs alone


def test_a_stage_that_cannot_compile_falls_back_with_one_warning_naming_it(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*a, **k):
            raise RuntimeError("backend exploded")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    net, ref = conv_net(), conv_net()
    precision.prepare(net, Choice("fp32", False, "default"))
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match=r"stage 1 \(body\).*backend exploded"):
        out = net.stages[0](x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        again = net.stages[0](x)
    torch.testing.assert_close(out, ref.stages[0](x), rtol=0, atol=0)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    assert list(net.state_dict()) == list(ref.state_dict())  # checkpoints keep their keys


def test_compile_wraps_each_stage_body_and_objective(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    net = precision.prepare(conv_net(3), Choice("fp32", False, "max-autotune"), stages=[1, 2])
    assert len(calls) == 4 and calls[0] == {"mode": "max-autotune"}
    assert isinstance(net.stages[1].body.forward, precision.CompiledOrEager)
    assert not isinstance(net.stages[0].body.forward, precision.CompiledOrEager)


def test_plain_backward_and_step_outside_fp16():
    update = PrecisionUpdate(BF16)
    lin = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    before = lin.weight.detach().clone()
    update.backward(lin(torch.ones(1, 3)).sum(), 0)
    update.step(opt, 0)
    assert update.scaler(0) is None and not torch.equal(before, lin.weight)


# -- bf16: the pipeline is still the sequential engine, bit for bit ------------------------------

def _optimizers(net):
    return [build_optimizer(s.parameters(), "sgd", 0.05, momentum=0.9, weight_decay=5e-4)
            for s in net.stages]


def _with_choice(engine, choice):
    """Give ``engine`` the run's StageUpdate; an engine without one runs under its autocast."""
    if hasattr(engine, "update"):
        engine.update = StageUpdate(choice)
        return contextlib.nullcontext()
    return precision.autocast(choice)


@pytest.mark.parametrize("channels_last", [False, True])
def test_in_bf16_the_pipeline_equals_the_sequential_engine_bit_for_bit(channels_last):
    choice = Choice("bf16", channels_last, None, "cpu", "test")
    a = precision.prepare(conv_net(4), choice)
    b = copy.deepcopy(a)
    oa, ob = _optimizers(a), _optimizers(b)
    ranges = assign_stages(4, 2)
    link = Loopback()
    local = LocalEngine()
    engines = [PipelineEngine(ranges[0], None, link), PipelineEngine(ranges[1], link, None)]
    contexts = [_with_choice(e, choice) for e in (local, *engines)]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        x = PrecisionUpdate(choice).input(x)
        with contexts[0]:
            la = local.step(a, oa, x, y)
        with contexts[1]:
            lb = engines[0].step(b, ob, x, y)
        with contexts[2]:
            lb[2:] = engines[1].step(b, ob)[2:]
        assert lb == la
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


# -- fp16 gradient scaling (on the CPU here: GradScaler works there too) --------------------------

FP16 = Choice("fp16", False, None, "cpu", "test")


def test_fp16_scales_each_stage_with_its_own_scaler():
    update = StageUpdate(FP16)
    lins = [torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in lins]
    before = [m.weight.detach().clone() for m in lins]
    for k, m in enumerate(lins):
        loss = m(torch.ones(2, 3)).sum() * (float("inf") if k == 0 else 1.0)
        update.backward(loss, k)
        update.step(opts[k], k)
    assert torch.equal(lins[0].weight, before[0])  # stage 1 overflowed: its step is skipped
    assert not torch.equal(lins[1].weight, before[1])  # stage 2 stepped all the same
    update.backward(lins[0](torch.ones(2, 3)).sum(), 0)  # the lazy update halves the scale
    assert update.scaler(0).get_scale() < update.scaler(1).get_scale()


def test_fp16_end_to_end_backward_steps_every_optimizer_with_its_scaler():
    update = StageUpdate(FP16)
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    ref_a, ref_b = copy.deepcopy(a), copy.deepcopy(b)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (a, b)]
    update.backward(b(a(torch.ones(2, 3))).sum(), 1)  # BP: one backward, the last stage's k
    for k, opt in enumerate(opts):
        update.step(opt, k)
    ref_opt = torch.optim.SGD([*ref_a.parameters(), *ref_b.parameters()], lr=0.1)
    ref_b(ref_a(torch.ones(2, 3))).sum().backward()
    ref_opt.step()
    torch.testing.assert_close(a.weight, ref_a.weight)  # unscaled exactly (powers of two)
    torch.testing.assert_close(b.weight, ref_b.weight)
    assert set(update.state_dict()) == {1}


# -- the hot loop: losses and times read once, data placed once ------------------------------

def test_losses_sum_on_their_device_and_are_read_once_per_interval():
    from locallearn.measure import LossTally

    tally = LossTally(3)
    for v in (1.0, 2.0, 6.0):
        tally.add(0, torch.tensor(v))
    tally.add(2, torch.tensor(0.5, dtype=torch.bfloat16))
    assert tally.read() == pytest.approx([3.0, float("nan"), 0.5], nan_ok=True)
    assert all(v != v for v in tally.read())  # read starts afresh
    tally.add(1, torch.tensor(4.0))
    tally.add(1, float("nan"))  # a stage that did not train: skipped
    assert tally.epoch() == pytest.approx({0: 3.0, 1: 4.0, 2: 0.5})  # every read since
    assert tally.epoch() == {}


def test_engines_return_each_trained_stages_loss_as_a_detached_tensor_not_a_float():
    from locallearn.engines import BackpropEngine

    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    net = conv_net(4)
    opts = _optimizers(net)
    for losses in (LocalEngine().step(net, opts, x, y),
                   BackpropEngine(aux_heads=True).step(net, opts, x, y),
                   BackpropEngine(aux_heads=False).step(net, opts, x, y)[-1:]):
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad
                   for v in losses)
    ranges = assign_stages(4, 2)
    first = PipelineEngine(ranges[0], None, Loopback())
    losses = first.step(net, opts, x, y)
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in losses[:2])
    assert all(isinstance(v, float) and v != v for v in losses[2:])  # another rank's stages


def test_the_loop_reads_the_losses_once_per_log_interval(monkeypatch, tmp_path):
    import locallearn as ll
    from locallearn import loop
    from locallearn.measure import LossTally

    reads = []
    read = LossTally.read
    monkeypatch.setattr(LossTally, "read", lambda self: reads.append(1) or read(self))
    monkeypatch.setattr(loop, "LOG_EVERY", 4)
    cfg = load_config(None, ["data=digits", "model=mlp", "model.options={hidden: [16, 16]}",
                             "split.k=2", "data.batch_size=32", "data.train_subset=320",
                             "train.epochs=1", "train.progress=false", "train.checkpoint=false",
                             f"train.out_dir={tmp_path}"])
    _, folder = ll.run(cfg)
    assert len(reads) == 10 // 4 + 1 + 1  # steps 4, 8, the last (10), then the epoch's mean
    from locallearn import runs

    losses = runs.read_metrics(folder)[0]["train_loss"]
    assert len(losses) == 2 and all(0 < v < 10 for v in losses)


def test_the_stage_clock_sums_the_time_of_each_stage_on_the_cpu():
    from locallearn.measure import StageClock

    clock = StageClock("cpu")
    for k in (0, 1, 1):
        with clock.time(k):
            torch.randn(64, 64) @ torch.randn(64, 64)
    seconds = clock.seconds()
    assert set(seconds) == {0, 1} and all(s > 0 for s in seconds.values())
    clock.reset()
    assert clock.seconds() == {}


def test_data_stay_on_the_host_for_a_cpu_device_and_bad_values_are_refused():
    from locallearn.data.core import load_data, place_data

    data = load_data("digits")
    assert place_data(data, "cpu", "true") is data and place_data(data, "cpu", "auto") is data
    with pytest.raises(ValueError, match="data.on_device"):
        place_data(data, "cpu", "sometimes")
