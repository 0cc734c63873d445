"""Fast by default: reduced precision, channels-last and compilation of every stage, chosen once.

A run says ``train.precision`` (``auto | fp32 | bf16 | fp16``), ``train.channels_last``
(``auto | true | false``) and ``train.compile`` (``false | true | <mode>``);
:func:`resolve` turns them into one :class:`Choice` for the run's device, and every
engine applies it through :class:`PrecisionUpdate` (the inside of
``engines.base.StageUpdate``), so the sequential, BP and pipelined engines run the very
same casts and stay equal to each other in any precision.

``auto`` picks what the hardware runs natively and fp32 elsewhere:

==========================================  =============  =============
device                                      precision      channels-last
==========================================  =============  =============
CUDA with bf16 (compute capability >= 8)    bf16           yes
CUDA without bf16                           fp32           no
CPU with AMX                                bf16           yes
AMD CPU with AVX512-BF16 (Zen 4 and later)  bf16           yes
other CPU with AVX-512 (incl. Intel         fp32           yes
AVX512-BF16 without AMX)
any other CPU, MPS, ...                     fp32           no
==========================================  =============  =============

The CPU rows follow ``benchmarks/speed`` (ResNet-20 training step, batch 64, 1 thread):
bf16 + channels-last ran 2.1x fp32 on an AMD EPYC with AVX512-BF16 (text models 1.8-2.0x),
but 0.99x on an Intel Xeon VM with AVX512-BF16 and no AMX exposed, where fp32 in
channels-last ran 1.27x.

Why bf16 and not fp16 on CPUs: bf16 has fp32's exponent range, so it needs no loss
scaling; fp16 is only offered on CUDA, with a :class:`torch.amp.GradScaler` per
stage optimizer (each stage steps on its own, so each has its own scale). Autocast
runs convolutions and matrix products in the low precision and keeps reductions that
need range in fp32 (``nll_loss``, ``mse_loss``, BatchNorm running statistics stay fp32
buffers); the objectives cast logits and contrastive similarities to fp32 themselves
(log-softmax and the temperature-scaled cosine similarities lose too much in bf16).

The environment variable ``LOCALLEARN_AUTO`` (``fp32``) makes ``auto`` resolve to fp32
and contiguous tensors: the test suite sets it so that every equivalence test of the
config path runs in fp32, while users keep the fast default.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from locallearn.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO_ENV = "LOCALLEARN_AUTO"
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Choice:
    """What a run trains with, resolved for one device.

    Attributes:
        precision: ``fp32``, ``bf16`` or ``fp16`` (never ``auto``).
        channels_last: model parameters and 4-D inputs in channels-last memory format.
        compile: ``None`` (eager) or the ``torch.compile`` mode (``"default"`` for true).
        device_type: ``cpu``, ``cuda``, ... (the autocast device type).
        reason: why ``auto`` chose this (for the log and env.json).
    """

    precision: str = "fp32"
    channels_last: bool = False
    compile: str | None = None
    device_type: str = "cpu"
    reason: str = "fp32 requested"

    @property
    def dtype(self) -> torch.dtype:
        """The autocast dtype (``torch.float32`` means no autocast)."""
        return DTYPES[self.precision]


FP32 = Choice()


# -- what the hardware runs natively --------------------------------------------------------

def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where there is no such file)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_native_bf16(flags: set[str] | None = None) -> tuple[bool, str]:
    """True (and which feature) if this CPU computes bf16 natively (AVX512-BF16 or AMX).

    Asks torch's own CPU capability checks first, then the cpuinfo ``flags``.
    """
    probes = (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    if flags is None:
        for name, probe in probes:
            check = getattr(torch.cpu, probe, None)
            if check is not None and check():
                return True, name
        flags = cpu_flags()
    for name, _ in probes:
        if name in flags:
            return True, name
    return False, "no avx512_bf16/amx_bf16 in the CPU flags"


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """True (with the reason) if ``device`` runs bf16 matrix products natively."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return True, f"CUDA {torch.cuda.get_device_name(device)} supports bf16"
        return False, "this CUDA device has no native bf16"
    if device.type == "cpu":
        return cpu_native_bf16()
    return False, f"no native bf16 known for device type {device.type}"


# -- resolving the config ---------------------------------------------------------------------

def parse_flag(key: str, value: Any, choices: Sequence[str] = ("auto", "true", "false")) -> str:
    """``value`` (a bool or a string) as one of ``choices``; a ValueError names ``key``."""
    text = {True: "true", False: "false"}.get(value, value) if isinstance(value, bool) else value
    text = str(text).lower()
    if text not in choices:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(choices)}")
    return text


def cpu_vendor(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's ``vendor_id`` in ``/proc/cpuinfo`` (``AuthenticAMD``, ``GenuineIntel``; "" if none)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("vendor_id")), "")


def auto_choice(device: torch.device | str) -> tuple[str, bool, str]:
    """What ``auto`` picks on ``device``: the precision, channels-last, and why.

    bf16 where it measured faster (module docstring): CUDA with bf16, CPUs with AMX, AMD
    CPUs with AVX512-BF16. Other AVX-512 CPUs, Intel's AVX512-BF16 without AMX among them,
    get fp32 in channels-last. ``$LOCALLEARN_AUTO=fp32`` pins fp32, contiguous.
    """
    device = torch.device(device)
    if os.environ.get(AUTO_ENV, "").lower() == "fp32":
        return "fp32", False, f"${AUTO_ENV}=fp32 pins auto to fp32"
    native, why = native_bf16(device)
    if device.type == "cuda":
        return ("bf16", True, why) if native else ("fp32", False, why)
    if device.type != "cpu":
        return "fp32", False, why
    if native and why == "amx_bf16":
        return "bf16", True, "amx_bf16: bf16 matrix units"
    if native and cpu_vendor() == "AuthenticAMD":
        return "bf16", True, (f"{why} on an AMD CPU: bf16 + channels-last measured 2.1x "
                              "fp32 there")
    if "avx512f" in cpu_flags() or native:
        return "fp32", True, (f"{why}: bf16 measured no faster than fp32 on Intel without "
                              "AMX; fp32 in channels-last (AVX-512)")
    return "fp32", False, why


def resolve(precision: str = "auto", channels_last: Any = "auto", compile: Any = "false",
            device: torch.device | str = "cpu") -> Choice:
    """The :class:`Choice` of a run on ``device``.

    Args:
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        channels_last: ``auto``, ``true`` or ``false`` (or a bool).
        compile: ``false``, ``true`` or a ``torch.compile`` mode such as ``max-autotune``.
        device: the device the stages train on.

    Raises:
        ValueError: for a value not allowed, or fp16 off CUDA (CPU autocast has no
            gradient scaler: use bf16 there).
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision={precision!r} is not allowed; "
                         f"choose one of: {', '.join(PRECISIONS)}")
    layout = parse_flag("train.channels_last", channels_last)
    mode = str(compile).lower() if not isinstance(compile, bool) else str(compile).lower()
    mode_or_none = None if mode in ("false", "none", "") else ("default" if mode == "true" else mode)
    reason = f"train.precision={precision} requested"
    if precision == "auto" or layout == "auto":
        fast, last, why = auto_choice(device)
        if precision == "auto":
            precision, reason = fast, f"auto: {why}"
        if layout == "auto":
            layout = "true" if last else "false"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.precision=fp16 needs a CUDA device (engine.device is {device}); "
                         "use train.precision=bf16 on CPUs")
    return Choice(precision, layout == "true", mode_or_none, device.type, reason)


def resolve_config(train: Any, device: torch.device | str) -> Choice:
    """The :class:`Choice` of a ``TrainConfig`` (its precision, channels_last, compile)."""
    return resolve(getattr(train, "precision", "auto"), getattr(train, "channels_last", "auto"),
                   getattr(train, "compile", "false"), device)


def describe(choice: Choice) -> dict[str, Any]:
    """What was chosen, for env.json and the start-up line (``precision``, ``channels_last``, ...)."""
    out = asdict(choice)
    out["compile"] = choice.compile or "false"
    out["autocast_dtype"] = str(choice.dtype).removeprefix("torch.")
    return out


def summary_line(choice: Choice) -> str:
    """One line for the start of a run: ``precision bf16, channels-last, eager (auto: ...)``."""
    layout = "channels-last" if choice.channels_last else "contiguous"
    comp = f"torch.compile mode {choice.compile}" if choice.compile else "eager"
    return f"precision {choice.precision}, {layout}, {comp} ({choice.reason})"


# -- applying it --------------------------------------------------------------------------------

def autocast(choice: Choice) -> contextlib.AbstractContextManager[Any]:
    """The forward context of a stage: ``torch.autocast`` in bf16/fp16, nothing in fp32."""
    if choice.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(choice.device_type, dtype=choice.dtype)


def to_channels_last(module: nn.Module) -> nn.Module:
    """``module`` with every 4-D parameter and buffer in channels-last format (in place)."""
    return module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def input_channels_last(x: Any) -> Any:
    """A 4-D tensor in channels-last format; anything else (token ids, masked text) unchanged."""
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


class CompiledOrEager:
    """``torch.compile(fn)`` that falls back to ``fn`` for good, with one warning naming it.

    Compilation happens lazily at the first call, so a model that cannot compile
    fails there; this wrapper catches that failure, warns once (``what`` names the
    stage) and runs eagerly from then on.
    """

    def __init__(self, fn: Callable[..., Any], mode: str, what: str) -> None:
        self.eager, self.what = fn, what
        self.compiled: Callable[..., Any] | None = None
        try:
            self.compiled = torch.compile(fn, mode=None if mode == "default" else mode)
        except Exception as e:  # noqa: BLE001 - any failure means: run eagerly
            self._fall_back(e)

    def _fall_back(self, error: BaseException) -> None:
        self.compiled = None
        warnings.warn(f"torch.compile failed for {self.what} ({type(error).__name__}: "
                      f"{str(error).splitlines()[0] if str(error) else ''}); it runs eagerly",
                      RuntimeWarning, stacklevel=3)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - a compile (not a model) error: fall back
                self._fall_back(e)
        return self.eager(*args, **kwargs)


def compile_stage(stage: nn.Module, mode: str, name: str) -> nn.Module:
    """Compile ``stage``'s body forward and its objective's loss (in place), each with a fallback.

    State-dict keys do not change (the modules stay; only the callables are wrapped),
    so checkpoints of compiled and eager runs are interchangeable.
    """
    body = getattr(stage, "body", None)
    if body is not None:
        body.forward = CompiledOrEager(body.forward, mode, f"{name} (body)")
    objective = getattr(stage, "objective", None)
    if objective is not None and hasattr(objective, "loss"):
        objective.loss = CompiledOrEager(objective.loss, mode, f"{name} (objective)")
    return stage


def prepare(net: nn.Module, choice: Choice, stages: Sequence[int] | None = None) -> nn.Module:
    """Apply ``choice`` to a placed net: channels-last parameters, compiled stages.

    Args:
        net: a LocalNet (anything with ``.stages``), already on its device.
        choice: the run's choice.
        stages: the stage indices to compile (default: all; a pipeline rank its own).
    """
    if choice.channels_last:
        to_channels_last(net)
    if choice.compile:
        all_stages = list(getattr(net, "stages", []))
        for k in (range(len(all_stages)) if stages is None else stages):
            compile_stage(all_stages[k], choice.compile, f"stage {k + 1}")
    return net


class PrecisionUpdate:
    """The inside of ``StageUpdate``: autocast, (scaled) backward and optimizer step per stage.

    In fp32 and bf16 it is plain ``loss.backward()`` and ``optimizer.step()``. In fp16
    (CUDA) the loss of stage ``k`` is scaled by stage ``k``'s own
    :class:`torch.amp.GradScaler` (every stage steps its own optimizer on its own loss,
    so one stage's overflow must not skip another's step). An optimizer steps with the
    scaler that scaled its gradients: its own stage's, or, after one end-to-end
    backward (BP, multi-exit), the scaler of that backward. A scaler updates its scale
    lazily, before it next scales a loss, so every optimizer it served stepped with
    the same scale.
    """

    def __init__(self, choice: Choice = FP32) -> None:
        self.choice = choice
        self.scalers: dict[int, Any] = {}
        self._scaled_by: dict[int, Any] = {}   # stage -> scaler of its pending gradients
        self._last: Any = None                 # scaler of the latest backward
        self._stepped: set[int] = set()        # id of scalers that stepped since their update

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward context of a stage and its local loss."""
        return autocast(self.choice)

    def input(self, x: Any) -> Any:
        """The network input in the run's memory format."""
        return input_channels_last(x) if self.choice.channels_last else x

    def scaler(self, k: int) -> Any:
        """Stage ``k``'s gradient scaler (fp16 only; ``None`` otherwise)."""
        if self.choice.precision != "fp16":
            return None
        if k not in self.scalers:
            self.scalers[k] = torch.amp.GradScaler(self.choice.device_type)
        return self.scalers[k]

    def backward(self, loss: torch.Tensor, k: int) -> None:
        """Backward of stage ``k``'s loss (scaled in fp16)."""
        scaler = self.scaler(k)
        if scaler is None:
            loss.backward()
            return
        if id(scaler) in self._stepped:  # the steps it served are done: new scale now
            scaler.update()
            self._stepped.discard(id(scaler))
        scaler.scale(loss).backward()
        self._scaled_by[k] = self._last = scaler

    def step(self, optimizer: torch.optim.Optimizer, k: int) -> None:
        """Stage ``k``'s optimizer step (unscaled, and skipped on inf/NaN, in fp16)."""
        if self.choice.precision != "fp16":
            optimizer.step()
            return
        scaler = self._scaled_by.pop(k, None) or self._last
        if scaler is None:  # no backward scaled anything: nothing to step
            return
        scaler.step(optimizer)
        self._stepped.add(id(scaler))

    def state_dict(self) -> dict[int, Any]:
        """The fp16 scalers' state (empty otherwise), for checkpoints."""
        for s in self.scalers.values():
            if id(s) in self._stepped:
                s.update()
                self._stepped.discard(id(s))
        return {k: s.state_dict() for k, s in self.scalers.items()}

    def load_state_dict(self, state: dict[Any, Any]) -> None:
        """Restore the scalers of :meth:`state_dict`."""
        for k, s in state.items():
            scaler = self.scaler(int(k))
            if scaler is not None:
                scaler.load_state_dict(s)


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """A region that computes in fp32 even inside autocast (losses that need the range)."""
    with torch.autocast(device_type, enabled=False):
        yield
