"""Reproduce the field's reference table (the InfoPro protocol) as a resumable matrix of runs.

A *protocol* (data, below) names a recipe and a matrix of (model, method, K, seed) cells.
Every cell is an ordinary run folder made by the library's own CLI in a subprocess::

    python -m locallearn train <protocol, method and cell overrides> \\
        train.name=<model>-<method>-k<K>-s<seed> train.out_dir=benchmarks/reproduce/runs/<protocol>

so anything the driver reports can be re-checked with ``locallearn compare`` or ``eval``.
The matrix is advanced in as many sittings as needed: a run whose ``summary.json`` holds
the planned epochs is *done* and skipped; a run folder with a checkpoint and no such
summary is *interrupted* and continued with ``locallearn train --resume <folder>``; a folder
without a checkpoint (killed in its first epoch) is removed and started again. While a run
trains, ``<name>.pid`` beside its folder holds the training process's id, so ``--status``
tells *running* from *interrupted*, and a second driver never starts a run twice.

Commands (see README.md)::

    python benchmarks/reproduce/run.py --protocol cpu --jobs 2          # advance the matrix
    python benchmarks/reproduce/run.py --protocol cpu --status          # done / running / left
    python benchmarks/reproduce/run.py --protocol cpu --dry-run         # print the commands
    python benchmarks/reproduce/run.py --protocol cpu --only dgl/4/0 'man/*/*'
    python benchmarks/reproduce/run.py --report                         # results.json, .md, .png
    python benchmarks/reproduce/run.py --protocol cpu --measure 20      # time 20 steps per cell

Before a run starts its overrides are validated in-process (unknown keys, objectives and
heads that the library does not register are refused with one line naming the method).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUNS = HERE / "runs"
DATA_DIR = Path(os.environ.get("LOCALLEARN_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()
REPORTED: tuple[str, ...] = ("cpu", "full")  # protocols collected into results.json / results.md (not smoke);
# the seeds protocols (below) are added to it once defined


def _fast_defaults() -> tuple[str, ...]:
    """``train.precision=auto`` where the library has the key (issue 13); else fp32 as before.
    Each run's config.yaml records what it used."""
    from dataclasses import fields

    from locallearn.config import TrainConfig

    return ("train.precision=auto",) if "precision" in {f.name for f in fields(TrainConfig)} else ()


# -- methods: name -> library overrides (the K-independent part) -------------------------------
# Each method is a configuration of stages x objectives x engines, written out here (not read
# from its preset) so a protocol's runs do not change when a preset's recipe does; the preset
# each follows is named, and tests/test_reproduce.py checks the objective section against it.
# `check_method` refuses any method whose keys, objective or head this library lacks.
METHODS: dict[str, tuple[str, ...]] = {
    "bp": ("engine=backprop", "engine.aux_heads=false"),
    "greedy": ("engine=local", "objective=ce", "objective.head=0c1f"),  # CE heads, no tricks
    "dgl": ("engine=local", "objective=ce", "objective.head=1c2f"),     # cifar10_resnet32_dgl
    # infopro_resnet32_contrast / _softmax: reconstruction + SupCon or CE, lambda schedules
    "infopro": ("engine=local", "objective=infopro", "objective.head=1c2f",
                "objective.options={variant: contrast}"),
    "infopro_softmax": ("engine=local", "objective=infopro", "objective.head=1c2f",
                        "objective.options={variant: softmax}"),
    # contsup_resnet32_cifar10 uses R1E; the matrix asks for context E (image encoder)
    "contsup": ("engine=local", "objective=ce", "objective.head=1c2f", "context=E"),
    # auglocal_resnet32_cifar10: later blocks as auxiliary nets, depth 3 falling to 1
    "auglocal": ("engine=local", "objective=auglocal", "objective.head=0c1f",
                 "objective.options={depth: 3, min_depth: 1}"),
    # man_resnet32_cifar10: 1c2f heads behind an EMA copy of the next stage's first block
    "man": ("engine=local", "objective=ce", "objective.head=1c2f",
            "objective.options={momentum_aux: 0.995}"),
    # gndgl_resnet32_cifar10 (there at K=1, default heads): G=2, stop-gradient + diversity,
    # here with DGL's 1c2f heads so that it differs from dgl by the groups only
    "gndgl": ("engine=local", "objective=ce", "objective.head=1c2f", "split.groups=2",
              "objective.detach_ratio=1.0", "objective.diversity_weight=0.5"),
}
PRESETS = {"dgl": "cifar10_resnet32_dgl", "infopro": "infopro_resnet32_contrast",
           "infopro_softmax": "infopro_resnet32_softmax", "auglocal": "auglocal_resnet32_cifar10",
           "man": "man_resnet32_cifar10"}  # configs/<name>.yaml with the same objective section


def method_overrides(method: str, k: int, methods: Mapping[str, tuple[str, ...]] = METHODS,
                     split_by: str = "memory") -> list[str]:
    """The overrides of ``method`` at K stages (BP is one stage; local methods cut by
    ``split_by``, memory-balanced as InfoPro's)."""
    if method not in methods:
        raise SystemExit(f"unknown method {method!r}; choose one of: {', '.join(methods)}")
    split = ["split.k=1"] if method == "bp" else [f"split.k={k}", f"split.by={split_by}"]
    return [*methods[method], *split]


# -- protocols ---------------------------------------------------------------------------------
def _sgd(lr: float) -> tuple[str, ...]:
    """InfoPro's optimizer: SGD, Nesterov momentum 0.9, weight decay 1e-4, cosine to 0."""
    return ("optim=sgd", f"optim.lr={lr:g}", "optim.momentum=0.9", "optim.nesterov=true",
            "optim.weight_decay=1e-4", "optim.schedule=cosine")


def _cells(methods: Sequence[str], ks: Sequence[int]) -> tuple[tuple[str, int], ...]:
    """BP once (K=1), every other method at every K."""
    return tuple([("bp", 1)] * ("bp" in methods)
                 + [(m, k) for m in methods if m != "bp" for k in ks])


@dataclass(frozen=True)
class Protocol:
    """A recipe and its matrix: every (model, cell, seed) is one run."""

    name: str
    about: str
    models: tuple[str, ...]
    width: float | None             # channel multiplier of the model (None: no width option)
    epochs: int
    batch: int
    lr: float
    cells: tuple[tuple[str, int], ...]  # (method, K)
    seeds: tuple[int, ...]
    data: tuple[str, ...] = ("data=cifar10", "data.augment=basic")  # basic: crop + flip
    optim: tuple[str, ...] = ()     # optimizer overrides besides lr (empty: InfoPro's SGD)
    extra: tuple[str, ...] = ()     # further overrides of every run
    methods: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: METHODS)
    split_by: str = "memory"        # how local methods place their K-1 cuts
    train_size: int = 50000         # training samples per epoch (for --measure's estimate)
    # -- the seeds' claims (issue 17); the InfoPro protocols leave these empty ----------------
    claim: str = ""                 # the results.md section of this protocol ("": InfoPro's table)
    model_extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # per-model overrides
    cuts: Mapping[str, str] = field(default_factory=dict)  # split_by=cuts: model -> "[2, 4, 5]"
    baseline: str = "bp"            # the method every gap is measured to
    exit_methods: tuple[str, ...] = ()  # trained runs of these also get `locallearn eval --exit`
    borrow: Mapping[str, str] = field(default_factory=dict)  # method -> protocol whose folders
    # hold that cell (the same overrides, tested): one run serves both protocols

    def overrides(self, model: str) -> list[str]:
        """Every override shared by this protocol's runs of ``model``."""
        width = [] if self.width is None else [f"model.options={{width: {self.width:g}}}"]
        optim = [*self.optim, f"optim.lr={self.lr:g}"] if self.optim else [*_sgd(self.lr)]
        return [f"model={model}", *width, *self.model_extra.get(model, ()), *self.data,
                f"data.batch_size={self.batch}", *optim, f"train.epochs={self.epochs}",
                "train.eval_every=1", "train.progress=false", *self.extra]

    def method_overrides(self, method: str, k: int, model: str = "") -> list[str]:
        out = method_overrides(method, k, self.methods, self.split_by)
        if self.split_by == "cuts" and "split.k=1" not in out:
            out.append(f"split.cuts={self.cuts[model or self.models[0]]}")
        return out

    def folder_name(self, method: str) -> str:
        """The protocol folder under runs/ that holds ``method``'s runs."""
        return self.borrow.get(method, self.name)


ALL = tuple(METHODS)
PROTOCOLS: dict[str, Protocol] = {p.name: p for p in [
    # InfoPro (Wang et al. 2021) §4 / appendix: 160 epochs, batch 1024, SGD lr 0.8 cosine,
    # Nesterov 0.9, wd 1e-4, crop + flip; 5 seeds. 2 models x 33 cells x 5 seeds = 330 runs.
    Protocol("full", "the InfoPro recipe at full budget (GPU)", ("resnet32", "resnet110"),
             width=1.0, epochs=160, batch=1024, lr=0.8, cells=_cells(ALL, (2, 4, 8, 16)),
             seeds=(0, 1, 2, 3, 4), extra=_fast_defaults()),
    # The same recipe scaled to ~8 h on 2 cores at 2 runs x 1 thread (README: how measured):
    # lr scaled linearly with the batch (0.8 x 128/1024 = 0.1). 22 runs.
    Protocol("cpu", "the InfoPro recipe scaled to 2 CPU cores", ("resnet32",),
             width=0.5, epochs=10, batch=128, lr=0.1,
             cells=_cells(("bp", "dgl", "infopro", "contsup", "auglocal", "man"), (4, 8)),
             seeds=(0, 1), extra=_fast_defaults()),
    # End-to-end check of the driver itself (seconds): 2 epochs so that a kill after the first
    # leaves a checkpoint to resume from.
    Protocol("smoke", "a seconds-long check of the driver", ("resnet32",), width=0.25,
             epochs=2, batch=32, lr=0.0125, cells=_cells(("bp", "dgl"), (2,)), seeds=(0,),
             data=("data=cifar10", "data.augment=basic", "data.train_subset=256",
                   "data.test_subset=128")),
]}



# -- the seeds' own claims (issue 17): one protocol per claim --------------------------------
# One protocol per claim, not one `seeds` protocol: the claims differ in model, data, optimizer,
# batch and epochs, and a Protocol is one recipe. `--protocol seeds` runs them all, in the order
# of SEEDS (cheapest claim first). Methods are written out per claim (a name means one thing
# within a protocol; `dgl` of the groups claim has the groups preset's MLP heads, that of
# context supply InfoPro's 1c2f). The preset each follows is named beside it.
_SUPCON = "temperature: 0.1, projector: mlp, proj_dim: 128, proj_hidden: 512"
_SIMCLR = "temperature: 0.5, neg_fraction: 1.0, projector: mlp, proj_hidden: 512, proj_dim: 128"
_ADAM: tuple[str, ...] = ("optim=adam", "optim.weight_decay=0", "optim.schedule=cosine", "optim.min_lr=1e-5")
_STRONG: tuple[str, ...] = ("data=cifar10", "data.augment=strong")


def _grow_triggers(epochs: int, k: int = 4) -> str:
    """The thesis' 50/100/150 of 200 epochs, scaled: stage i+1 joins after i/k of the epochs."""
    return "[" + ", ".join(str(round(epochs * i / k)) for i in range(1, k)) + "]"


def scpl_methods(epochs: int) -> dict[str, tuple[str, ...]]:
    """SCPL, DASCPL and the ablations of issue 17 item 1 (configs/{scpl,dascpl}_vgg8.yaml)."""
    scpl = ("engine=local", "objective=supcon", f"objective.options={{{_SUPCON}, proj_pool: avg}}")
    dascpl = ("engine=local", "objective=supcon", "objective.predictor=0c1f",
              f"objective.options={{{_SUPCON}, proj_pool: avg, classifier: none}}")
    return {
        "bp": METHODS["bp"],                      # end-to-end BP of the model's own task head
        "scpl": scpl,                             # scpl_vgg8 / scpl_resnet18
        "dascpl": dascpl,                         # dascpl_vgg8 without accumulation
        "dascpl_grow": (*dascpl, "train.accumulate=grow",  # dascpl_vgg8 (triggers scaled)
                        f"train.triggers={_grow_triggers(epochs)}"),
        # ablations (protocol seeds-scpl-ablation): one knob of `scpl` each
        "bp_basic": (*METHODS["bp"], "data.augment=basic"),
        "scpl_basic": (*scpl, "data.augment=basic"),
        "scpl_linproj": ("engine=local", "objective=supcon",
                         "objective.options={temperature: 0.1, projector: linear, proj_dim: 128, "
                         "proj_pool: avg}"),
        "scpl_t05": ("engine=local", "objective=supcon",
                     "objective.options={temperature: 0.5, projector: mlp, proj_dim: 128, "
                     "proj_hidden: 512, proj_pool: avg}"),
        "scpl_b1024": (*scpl, "data.batch_size=1024"),
        "scpl_ce_all": ("engine=local", "objective=supcon",  # every stage adds a CE classifier
                        f"objective.options={{{_SUPCON}, proj_pool: avg, classifier: all}}"),
    }


TEXT_METHODS: dict[str, tuple[str, ...]] = {
    "bp": METHODS["bp"],
    # text_scpl_imdb_lstm: SupCon on a mean-pooled MLP projector, CE classifier on the last
    # stage, linear predictors on detached outputs (stage accuracies; the last answers by its)
    "scpl": ("engine=local", "objective=supcon", "objective.predictor=linear",
             f"objective.options={{{_SUPCON}}}"),
}
TEXT_MODELS = {  # text_{imdb,sst2}_{lstm,transformer}.yaml: the SCPL code's sizes
    "lstm": ("model.options={embed_dim: 300, hidden: 300, layers: 4, pool: mean}",),
    "transformer": ("model.options={dim: 300, heads: 6, ff: 1024, layers: 4, dropout: 0.1, "
                    "norm_first: true, pool: mean}",),
}


def group_methods(gs: Sequence[int] = (2, 4, 8)) -> dict[str, tuple[str, ...]]:
    """GN-DGL on VGG6a (configs/gndgl_vgg6a_cifar10.yaml: MLP heads, hidden 256): DGL and, per
    G, plain groups, diversity, stop-gradient + diversity, and the capacity control."""
    base = ("engine=local", "objective=ce", "objective.head=mlp")
    out = {"bp": METHODS["bp"], "dgl": base}
    for g in gs:
        grouped = (*base, f"split.groups={g}")
        out[f"gn{g}"] = grouped
        out[f"gn{g}_div"] = (*grouped, "objective.diversity_weight=0.5")
        out[f"gn{g}_sgdiv"] = (*grouped, "objective.detach_ratio=1.0",
                               "objective.diversity_weight=0.5")
        # control: plain groups whose heads have the stop-gradient heads' size. A rho=1 head
        # flattens all C channels into its 256-wide hidden layer; a plain head flattens C/G, so
        # a hidden layer G x 256 wide gives it the same weights and MACs (to the last layer's
        # 256 (G-1) x 10) without the other groups' information.
        out[f"gn{g}_wide"] = (*grouped, f"objective.options={{hidden: [{256 * g}]}}")
    return out


CONTSUP_METHODS: dict[str, tuple[str, ...]] = {
    "bp": METHODS["bp"],
    "dgl": METHODS["dgl"],                       # plain: the same cell as issue 15's dgl
    # contsup_resnet32_cifar10 (R1E) and its E variant, with recomputed encoders (the
    # encoders keep only their inputs and run again in backward: same training, less memory)
    "contsup_e": (*METHODS["dgl"], "context=E", "context.recompute=true"),
    "contsup_r1e": (*METHODS["dgl"], "context=R1E", "context.recompute=true"),
}

SELFSUP_METHODS: dict[str, tuple[str, ...]] = {
    # selfsup_vgg6a_e2e: backprop of the last stage's NT-Xent; the K=4 cuts place the probes
    "simclr_e2e": ("engine=backprop", "engine.aux_heads=false", "objective=simclr",
                   f"objective.options={{{_SIMCLR}}}"),
    "simclr_const": ("engine=local", "objective=simclr", f"objective.options={{{_SIMCLR}}}"),
    # selfsup_vgg6a_sched: softer softmax, fewer negatives, wider projector early on
    "simclr_sched": ("engine=local", "objective=simclr", f"objective.options={{{_SIMCLR}}}",
                     "objective.difficulty={temperature: {rule: geometric, first: 1.0, last: 0.5}, "
                     "neg_fraction: {rule: geometric, first: 0.0625, last: 1.0}, "
                     "proj_hidden: {rule: geometric, first: 2048, last: 512}}"),
}

VISION_EPOCHS = 30  # the SCPL vision budget (README: why)
SCPL_CUTS = {"vgg8": "[2, 4, 5]", "resnet18": "[3, 5, 7]"}  # the SCPL code's 4 modules
# 1. SCPL vs BP, vision (Ho 2023): the thesis recipe (Adam 1e-3 cosine to 1e-5, strong
#    augmentation, avg-pool MLP projector, tau 0.1) at width 0.25, 30 epochs, batch 256.
SCPL_VISION = Protocol(
    "seeds-scpl-vision", "SCPL vs BP, VGG8 and ResNet-18, CIFAR-10", ("vgg8", "resnet18"),
    width=0.25, epochs=VISION_EPOCHS, batch=256, lr=1e-3, cells=(("bp", 1), ("scpl", 4)),
    seeds=(0, 1), data=_STRONG, optim=_ADAM, split_by="cuts", cuts=SCPL_CUTS,
    methods=scpl_methods(VISION_EPOCHS), extra=_fast_defaults(), claim="scpl-vision")
SEEDS: dict[str, Protocol] = {p.name: p for p in [
    SCPL_VISION,
    # 3. DASCPL on the SCPL VGG8 above (same recipe): per-stage predictors for early exit, and
    #    dynamic layer accumulation; BP is the vision protocol's own run (borrowed).
    replace(SCPL_VISION, name="seeds-dascpl", about="DASCPL: early exit and layer accumulation, VGG8",
            models=("vgg8",), cells=(("bp", 1), ("dascpl", 4), ("dascpl_grow", 4)),
            claim="dascpl", exit_methods=("dascpl", "dascpl_grow"),
            borrow={"bp": "seeds-scpl-vision"}),
    # 1b. what the gap of claim 1 comes from: one knob each, VGG8, seed 0 (run if the gap stays)
    replace(SCPL_VISION, name="seeds-scpl-ablation", about="SCPL ablations, VGG8", models=("vgg8",),
            cells=tuple((m, 1 if m.startswith("bp") else 4) for m in (
                "bp_basic", "scpl_basic", "scpl_linproj", "scpl_t05", "scpl_b1024", "scpl_ce_all")),
            seeds=(0,), claim="scpl-ablation"),
    # 2. SCPL vs BP, text: the SCPL code's LSTM / Transformer (D=300, 4 layers, K=4), Adam 1e-3
    #    cosine to 1e-5, batch 128; IMDB at max_len 350, SST-2 at 15.
    Protocol("seeds-scpl-sst2", "SCPL vs BP, LSTM and Transformer, SST-2 (max_len 15)",
             ("lstm", "transformer"), width=None, epochs=5, batch=128, lr=1e-3,
             cells=(("bp", 1), ("scpl", 4)), seeds=(0, 1), data=("data=sst2", "data.options={max_len: 15}"), optim=_ADAM,
             split_by="count", methods=TEXT_METHODS, model_extra=TEXT_MODELS,
             train_size=67349, claim="scpl-text", extra=_fast_defaults()),
    Protocol("seeds-scpl-imdb", "SCPL vs BP, LSTM and Transformer, IMDB (max_len 350)",
             ("lstm", "transformer"), width=None, epochs=5, batch=128, lr=1e-3,
             cells=(("bp", 1), ("scpl", 4)), seeds=(0, 1),
             data=("data=imdb", "data.options={max_len: 350, vocab_size: 30000}"), optim=_ADAM,
             split_by="count", methods=TEXT_METHODS, model_extra=TEXT_MODELS,
             train_size=25000, claim="scpl-text", extra=_fast_defaults()),
    # 4. GN-DGL, VGG6a at width 0.25 (32/64/128/128 channels, divisible by 8), K=4 (one conv a
    #    stage), MLP heads, Adam 1e-3 cosine, batch 128, crop + flip.
    Protocol("seeds-groups", "GN-DGL on VGG6a: DGL vs G = 2, 4, 8", ("vgg6a",), width=0.25,
             epochs=20, batch=128, lr=1e-3,
             cells=(("bp", 1), ("dgl", 4), *((f"gn{g}{v}", 4) for g in (2, 4, 8)
                                            for v in ("", "_div", "_sgdiv", "_wide"))),
             seeds=(0, 1), optim=(*_ADAM[:3], "optim.min_lr=0"), split_by="count",
             methods=group_methods(), claim="groups", extra=_fast_defaults()),
    # 5. ContSup, ResNet-32: issue 15's cpu recipe (width 0.5, 10 epochs, SGD 0.1 cosine,
    #    memory-balanced cuts), so BP and plain K=8 are that protocol's runs (borrowed).
    Protocol("seeds-contsup", "ContSup on ResNet-32: plain vs E vs R1E at K = 8, 16",
             ("resnet32",), width=0.5, epochs=10, batch=128, lr=0.1,
             cells=_cells(("bp", "dgl", "contsup_e", "contsup_r1e"), (8, 16)), seeds=(0, 1),
             methods=CONTSUP_METHODS, claim="contsup", extra=_fast_defaults(),
             borrow={"bp": "cpu", "dgl": "cpu"}),
    # 6. local SimCLR, VGG6a at width 0.25, K=4 (one conv a stage), batch 256 (510 negatives),
    #    Adam 1e-3 wd 1e-6 cosine, strong augmentation; linear probes of every stage at the end.
    Protocol("seeds-selfsup", "local SimCLR K=4: e2e vs constant vs depth schedule", ("vgg6a",),
             width=0.25, epochs=30, batch=256, lr=1e-3,
             cells=tuple((m, 4) for m in SELFSUP_METHODS), seeds=(0, 1), data=_STRONG,
             optim=("optim=adam", "optim.weight_decay=1e-6", "optim.schedule=cosine"),
             split_by="count", methods=SELFSUP_METHODS, baseline="simclr_e2e", claim="selfsup",
             extra=(*_fast_defaults(), "train.eval_every=1000")),
]}
PROTOCOLS.update(SEEDS)
REPORTED = (*REPORTED, *SEEDS)
# `--protocol seeds`: every claim, in this order (README: why); the ablation only on demand
# (seeds-cpu: without IMDB, whose len-350 D=300 runs take about a day each on one core)
GROUPS: dict[str, tuple[str, ...]] = {"seeds": (
    "seeds-groups", "seeds-contsup", "seeds-scpl-sst2", "seeds-scpl-vision", "seeds-dascpl",
    "seeds-selfsup", "seeds-scpl-imdb")}
GROUPS["seeds-cpu"] = GROUPS["seeds"][:-1]


# -- the matrix --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One cell of a protocol's matrix at one seed."""

    protocol: Protocol = field(repr=False, compare=False)
    model: str
    method: str
    k: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.model}-{self.method}-k{self.k}-s{self.seed}"

    @property
    def cell(self) -> str:
        """The name without the seed: runs of one cell differ only by seed."""
        return f"{self.model}-{self.method}-k{self.k}"

    @property
    def key(self) -> str:
        """The ``--only`` form: METHOD/K/SEED (``matrix`` also accepts MODEL/METHOD/K/SEED)."""
        return f"{self.method}/{self.k}/{self.seed}"

    def folder(self, runs: Path = RUNS) -> Path:
        return runs / self.protocol.folder_name(self.method) / self.name

    @property
    def needs_exit(self) -> bool:
        """Whether this run ends with an early-exit curve (``exit_curve.json``)."""
        return self.method in self.protocol.exit_methods

    def overrides(self, runs: Path = RUNS, threads: int = 1, device: str = "") -> list[str]:
        """Every override of a fresh start of this run."""
        out = [*self.protocol.overrides(self.model),
               *self.protocol.method_overrides(self.method, self.k, self.model),
               f"train.seed={self.seed}", f"train.name={self.name}",
               f"train.out_dir={self.folder(runs).parent}", f"data.data_dir={DATA_DIR}",
               f"engine.threads={threads}"]
        return out + ([f"engine.device={device}"] if device else [])


def matrix(protocol: Protocol, only: Sequence[str] = ()) -> list[Run]:
    """The protocol's runs (seed-major, so a partial matrix has every cell at seed 0 first),
    kept to those matching one of ``only`` (``METHOD/K/SEED`` or ``MODEL/METHOD/K/SEED``,
    shell wildcards allowed)."""
    runs = [Run(protocol, model, method, k, seed) for seed in protocol.seeds
            for model in protocol.models for method, k in protocol.cells]
    if not only:
        return runs
    return [r for r in runs if any(fnmatch.fnmatchcase(r.key, p)
                                   or fnmatch.fnmatchcase(f"{r.model}/{r.key}", p) for p in only)]


def _filter(only: Sequence[str]) -> Sequence[str]:
    bad = [p for p in only if p.count("/") not in (2, 3)]
    if bad:
        raise SystemExit(f"--only takes METHOD/K/SEED (or MODEL/METHOD/K/SEED), not {bad[0]!r}")
    return only


def check_method(method: str, protocol: Protocol | None = None, k: int = 4,
                 model: str = "") -> None:
    """Refuse (SystemExit naming the method) a method the installed library cannot build:
    keys the config lacks, a model, data set, objective, head, predictor or context mode it
    does not register, or a model or objective option its builder does not take."""
    from locallearn.config import ConfigError, load_config

    protocol = protocol or PROTOCOLS["cpu"]
    model = model or protocol.models[0]
    try:
        cfg = load_config(None, [*protocol.overrides(model),
                                 *protocol.method_overrides(method, k, model)])
    except ConfigError as e:
        raise SystemExit(f"method {method!r} is not available in this locallearn: {e} "
                         f"(update METHODS in {Path(__file__).name} to the library's preset)") from e
    missing = unregistered(cfg)
    if missing:
        raise SystemExit(f"method {method!r} needs {' and '.join(missing)}, which this locallearn "
                         f"does not register or take (`python -m locallearn list`); update the "
                         f"methods in {Path(__file__).name} once it lands")


def _takes(fn: Callable[..., Any]) -> tuple[set[str], bool]:
    """The keyword names ``fn`` takes and whether it also takes ``**kwargs``."""
    import inspect

    params = inspect.signature(fn).parameters.values()
    return ({p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)},
            any(p.kind == p.VAR_KEYWORD for p in params))


def unregistered(cfg: Any) -> list[str]:
    """What ``cfg`` names that the installed library does not register or take, in words.

    The objective's options are checked against ``objectives.base.objective_options`` (its
    builder's keywords, and its head's where it passes options on), so an option nobody reads
    (a typo) is refused here, before any run starts.
    """
    from locallearn.data.core import DATASETS
    from locallearn.models.blocks import MODELS
    from locallearn.objectives import HEAD_KINDS, OBJECTIVES
    from locallearn.objectives.base import STAGE_KEYS, objective_options

    o, missing = cfg.objective, []
    missing += [f"model {cfg.model.name!r}"] * (cfg.model.name not in MODELS)
    missing += [f"data set {cfg.data.name!r}"] * (cfg.data.name not in DATASETS)
    missing += [f"objective {o.name!r}"] * (o.name not in OBJECTIVES)
    missing += [f"head {h!r}" for h in dict.fromkeys((o.head, *o.heads)) if h not in HEAD_KINDS]
    missing += [f"predictor head {o.predictor!r}"] * bool(o.predictor and o.predictor not in HEAD_KINDS)
    if cfg.model.name in MODELS:
        names, _ = _takes(MODELS[cfg.model.name][0])
        missing += [f"model option {cfg.model.name}.{key}" for key in cfg.model.options
                    if key not in names]
    if o.name in OBJECTIVES:  # the library's own list of the options it reads
        known = {*objective_options(o.name), *STAGE_KEYS, "head", "last"}
        missing += [f"objective option {o.name}.{key}" for key in o.options if key not in known]
    return missing


def check_protocol_keys(protocol: Protocol) -> None:
    """Refuse a protocol whose shared overrides name keys the library lacks."""
    from locallearn.config import ConfigError, load_config

    try:
        load_config(None, protocol.overrides(protocol.models[0]))
    except ConfigError as e:
        raise SystemExit(f"protocol {protocol.name!r}: {e}") from e


# -- run folders: state, times, results --------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def metrics(folder: Path) -> list[dict[str, Any]]:
    """The epoch rows of a run folder (a half-written last line is ignored)."""
    try:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def _alive(pid: int, name: str) -> bool:
    """True if process ``pid`` runs and its command line names ``name`` (not a reused pid)."""
    try:
        return name in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def pid_alive(folder: Path) -> int | None:
    """The pid of the process training ``folder``, if alive: from the driver's ``<name>.pid``
    beside it, or from the library's own ``.lock`` inside it ("pid N on HOST")."""
    for path, word in ((folder.with_name(folder.name + ".pid"), 0), (folder / ".lock", 1)):
        try:
            pid = int(path.read_text().split()[word])
        except (OSError, ValueError, IndexError):
            continue
        if _alive(pid, folder.name):
            return pid
    return None


def state(run: Run, runs: Path = RUNS) -> str:
    """``done``, ``running``, ``interrupted`` (resumable), ``stale`` (no checkpoint), ``left``,
    or ``evaluate`` (trained, its early-exit curve not yet drawn: ``Protocol.exit_methods``)."""
    folder = run.folder(runs)
    summary = _read_json(folder / "summary.json")
    if summary and summary.get("epochs", 0) >= run.protocol.epochs:
        if run.needs_exit and not (folder / "exit_curve.json").is_file():
            return "running" if pid_alive(folder) else "evaluate"  # trained; exit curve to do
        return "done"
    if pid_alive(folder):
        return "running"
    if (folder / "checkpoint.pt").is_file():
        return "interrupted"
    return "stale" if folder.exists() else "left"


def train_seconds(folder: Path) -> float:
    """Machine time of a run's training epochs so far (sum of ``epoch_seconds``)."""
    return sum(r.get("epoch_seconds", 0.0) for r in metrics(folder))


def result_row(run: Run, runs: Path = RUNS) -> dict[str, Any] | None:
    """The results.json row of a finished run, or None."""
    folder = run.folder(runs)
    summary = _read_json(folder / "summary.json")
    if not summary:
        return None
    accs = [r["final_acc"] for r in metrics(folder) if r.get("final_acc") is not None]
    p = run.protocol
    row = {"protocol": p.name, "model": run.model, "width": p.width, "epochs": summary["epochs"],
           "method": run.method, "k": run.k, "seed": run.seed,
           "final_acc": summary.get("final_acc"), "best_acc": max(accs, default=None),
           "train_seconds": summary.get("train_seconds"),
           "saved_bytes_peak": summary.get("saved_bytes_peak")}
    if not p.claim:
        return row
    return {**row, "run": f"{folder.parent.name}/{folder.name}", **claim_fields(folder, summary, p)}


def claim_fields(folder: Path, summary: Mapping[str, Any], p: Protocol) -> dict[str, Any]:
    """The extra fields of a seeds-claim row: per-stage accuracy, ensemble, node MACs, the
    training-MACs fraction (layer accumulation), the early-exit summary and the probes."""
    fractions = [r["train_macs_fraction"] for r in metrics(folder) if "train_macs_fraction" in r]
    exit_curve = _read_json(folder / "exit_curve.json")
    exit_fields = None
    if exit_curve:
        exit_fields = {"full_acc": exit_curve["full_acc"], "best": exit_curve.get("best_within_1pt"),
                       "fixed": [{k: f[k] for k in ("stage", "acc", "macs_fraction")}
                                 for f in exit_curve.get("fixed", [])],
                       "curve": sorted([p_["macs_fraction"], p_["acc"]]
                                       for p_ in exit_curve.get("curve", []))}
    return {"claim": p.claim, "data": next((d.split("=", 1)[1] for d in p.data
                                            if d.startswith("data=")), ""),
            "stage_acc": summary.get("stage_acc"), "ens_weighted": summary.get("ens_weighted"),
            "largest_node_macs": summary.get("largest_node_macs"),
            "total_macs": summary.get("total_macs"),
            "train_macs_fraction": sum(fractions) / len(fractions) if fractions else None,
            "exit": exit_fields, "probe_acc": summary.get("probe_acc"),
            "effective_rank": summary.get("effective_rank")}


def epoch_estimate(run: Run, runs: Path, finished: list[tuple[Run, float]],
                   measured: dict[str, float]) -> float | None:
    """Seconds per epoch expected of ``run``: its own epochs so far, else finished runs of the
    same model/method/K, same model/method, then ``--measure`` figures, then any finished run."""
    own = [r["epoch_seconds"] for r in metrics(run.folder(runs)) if "epoch_seconds" in r]
    if own:
        return sum(own) / len(own)
    for same in (lambda o: (o.model, o.method, o.k) == (run.model, run.method, run.k),
                 lambda o: (o.model, o.method) == (run.model, run.method)):
        times = [t for o, t in finished if same(o)]
        if times:
            return sum(times) / len(times)
    if run.cell in measured:
        return measured[run.cell]
    return sum(t for _, t in finished) / len(finished) if finished else None


def status(protocol: Protocol, only: Sequence[str] = (), runs: Path = RUNS,
           jobs: int = 1) -> dict[str, Any]:
    """Counts, per-run lines, machine time spent and still needed (see ``epoch_estimate``)."""
    plan = matrix(protocol, only)
    states = {r.name: state(r, runs) for r in plan}
    finished = [(r, train_seconds(r.folder(runs)) / max(len(metrics(r.folder(runs))), 1))
                for r in plan if states[r.name] == "done"]
    measured = _read_json(runs / protocol.name / "measure.json") or {}
    measured = {k: v["epoch_seconds"] for k, v in measured.get("cells", {}).items()}
    spent, needed, unknown, lines = 0.0, 0.0, 0, []
    for r in plan:
        folder, s = r.folder(runs), states[r.name]
        done_epochs = len(metrics(folder)) if s != "stale" else 0
        spent += train_seconds(folder)
        left = 0 if s in ("done", "evaluate") else protocol.epochs - done_epochs
        per_epoch = epoch_estimate(r, runs, finished, measured) if left else 0.0
        if per_epoch is None:
            unknown += 1
        else:
            needed += left * per_epoch
        lines.append(f"  {r.name:<34} {s:<12} {done_epochs:>4}/{protocol.epochs} epochs  "
                     f"{duration(train_seconds(folder)):>8}")
    counts = {s: sum(v == s for v in states.values())
              for s in ("done", "running", "evaluate", "interrupted", "stale", "left")}
    return {"protocol": protocol.name, "runs": len(plan), "counts": counts, "lines": lines,
            "spent_seconds": spent, "needed_seconds": needed,
            "needed_wall_seconds": needed / max(jobs, 1), "unestimated": unknown}


def duration(seconds: float) -> str:
    """``2h05m``, ``14m`` or ``9s``."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    return f"{int(seconds // 60)}m" if seconds >= 60 else f"{seconds:.0f}s"


def print_status(s: dict[str, Any], jobs: int) -> None:
    counts = ", ".join(f"{n} {k}" for k, n in s["counts"].items() if n)
    print(f"protocol {s['protocol']}: {s['runs']} runs: {counts}")
    print("\n".join(s["lines"]))
    print(f"machine time spent: {duration(s['spent_seconds'])} of training epochs; still needed: "
          f"{duration(s['needed_seconds'])} (~{duration(s['needed_wall_seconds'])} wall at "
          f"{jobs} jobs)"
          + (f"; {s['unestimated']} runs not estimated (no finished run or --measure yet)"
             if s["unestimated"] else ""))


# -- launching ---------------------------------------------------------------------------------
def command(run: Run, runs: Path = RUNS, threads: int = 1, device: str = "") -> list[str]:
    """The CLI command that starts ``run`` afresh or continues it from its checkpoint."""
    base = [sys.executable, "-m", "locallearn", "train"]
    folder = run.folder(runs)
    if run.needs_exit and state(run, runs) == "evaluate":  # accuracy vs MACs of every exit
        return [sys.executable, "-m", "locallearn", "eval", str(folder), "--exit",
                "--data-dir", str(DATA_DIR)]
    if (folder / "checkpoint.pt").is_file():  # resumed runs keep their saved config, but the
        # data may have moved (another machine) and the threads are this invocation's
        return [*base, "--resume", str(folder), f"train.epochs={run.protocol.epochs}",
                f"data.data_dir={DATA_DIR}", f"engine.threads={threads}"]
    return [*base, *run.overrides(runs, threads, device)]


def start(run: Run, runs: Path, threads: int, device: str) -> subprocess.Popen[bytes]:
    """Start ``run`` in a subprocess (log beside its folder); a pid file marks it running."""
    folder = run.folder(runs)
    if folder.exists() and state(run, runs) == "stale":
        shutil.rmtree(folder)  # killed before its first checkpoint: nothing to resume
    folder.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = open(folder.with_name(folder.name + ".log"), "ab")
    proc = subprocess.Popen(command(run, runs, threads, device), cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_default_sigint)
    log.close()
    _pid_file(run, runs).write_text(f"{proc.pid}\n")
    return proc


def _default_sigint() -> None:
    """In the child before exec: let SIGINT reach it even when the driver runs in the
    background (where the shell starts it with SIGINT ignored, which children inherit)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def advance(plan: list[Run], runs: Path, jobs: int, threads: int, device: str,
            after_each: Callable[[], None] | None = None) -> int:
    """Run what is not done or running, ``jobs`` at a time; returns the number of failures.

    Ctrl-C stops the running runs too (each keeps its last epoch's checkpoint) and exits 130.
    """
    todo = [r for r in plan if state(r, runs) in ("interrupted", "stale", "left", "evaluate")]
    evaluated: set[str] = set()  # runs whose exit curve was attempted (once per invocation)
    print(f"{len(todo)} runs to train ({len(plan) - len(todo)} done or running)", flush=True)
    active: dict[subprocess.Popen[bytes], Run] = {}
    failures = 0
    try:
        while todo or active:
            while todo and len(active) < jobs:
                r = todo.pop(0)
                now = state(r, runs)
                if now in ("running", "done"):  # another driver took it meanwhile
                    print(f"skip {r.name} ({now} elsewhere)", flush=True)
                    continue
                how = ("exit curve" if now == "evaluate" else "resume"
                       if (r.folder(runs) / "checkpoint.pt").is_file() else "fresh")
                evaluated.update([r.name] if how == "exit curve" else [])
                print(f"start {r.name} ({how})", flush=True)
                active[start(r, runs, threads, device)] = r
            time.sleep(1.0)
            for proc in [p for p in active if p.poll() is not None]:
                r = active.pop(proc)
                _pid_file(r, runs).unlink(missing_ok=True)
                if proc.returncode == 0 and state(r, runs) == "evaluate" and r.name not in evaluated:
                    evaluated.add(r.name)  # trained: draw its exit curve next
                    todo.insert(0, r)
                    continue
                ok = proc.returncode == 0 and state(r, runs) == "done"
                failures += not ok
                print(f"{'done' if ok else 'FAILED'} {r.name} (exit {proc.returncode}; log "
                      f"{_pid_file(r, runs).with_suffix('.log')})", flush=True)
                if after_each:
                    after_each()
    except KeyboardInterrupt:
        print("interrupted: stopping the running runs (rerun the same command to resume)")
        _stop(active, runs)
        raise SystemExit(130) from None
    return failures


def _pid_file(run: Run, runs: Path) -> Path:
    return run.folder(runs).with_name(run.name + ".pid")


def _stop(active: dict[subprocess.Popen[bytes], Run], runs: Path) -> None:
    """Interrupt runs the terminal's Ctrl-C did not reach, wait for them, remove pid files."""
    time.sleep(2.0)
    for proc in active:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc, r in active.items():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _pid_file(r, runs).unlink(missing_ok=True)


def measure(protocol: Protocol, steps: int, only: Sequence[str], threads: int, device: str = "",
            budget_hours: float = 8.0, jobs: int = 2) -> dict[str, Any]:
    """Time ``steps`` optimizer steps of each cell (seed 0) through the CLI; write measure.json.

    Each cell trains one epoch of ``steps x batch`` training images (so its ``epoch_seconds``
    is the time of ``steps`` steps, one of them under the saved-tensor meter), evaluated on 256
    test images, into ``runs/<protocol>-measure/``. On a shared machine a process gets only a
    share of its core: the step time is also given scaled by that share (the training process's
    CPU seconds over its wall seconds), the time it would take on a core of its own. Per-epoch
    figures scale the step to ``protocol.train_size`` samples; evaluation (about 7 % more) is not included.
    """
    scratch = RUNS / f"{protocol.name}-measure"
    shutil.rmtree(scratch, ignore_errors=True)
    cells: dict[str, Any] = {}
    steps_per_epoch = math.ceil(protocol.train_size / protocol.batch)
    for run in [r for r in matrix(protocol, only) if r.seed == protocol.seeds[0]]:
        # one epoch of the whole net: accumulation (which trains fewer stages early) is off, so
        # a grow run is estimated at its upper bound
        grow = ["train.accumulate=none", "train.triggers=[]"] * any(
            o.startswith("train.accumulate=") for o in run.overrides(scratch))
        cmd = [sys.executable, "-m", "locallearn", "train", *run.overrides(scratch, threads, device),
               "train.epochs=1", "train.checkpoint=false", f"data.train_subset={steps * protocol.batch}",
               "data.test_subset=256", *grow]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
        rows = metrics(run.folder(scratch))
        if done.returncode or not rows:
            print(f"{run.name}: failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
            continue
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        share = 1.0 if device.startswith("cuda") else min(1.0, cpu / wall / threads)  # GPU: as is
        step = rows[0]["epoch_seconds"] / steps
        cells[run.cell] = {"step_seconds_measured": step, "cpu_share": share,
                           "step_seconds": step * share,
                           "epoch_seconds": step * share * steps_per_epoch}
        print(f"{run.cell}: {step:.3f} s/step at {100 * share:.0f} % of a core -> "
              f"{step * share:.3f} s/step on its own -> "
              f"{step * share * steps_per_epoch / 60:.1f} min/epoch", flush=True)
    per_epoch = sum(cells[r.cell]["epoch_seconds"] for r in matrix(protocol, only) if r.cell in cells)
    out = {"steps": steps, "threads": threads, "batch": protocol.batch, "epochs": protocol.epochs,
           "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_average": os.getloadavg(), "cells": cells,
           "matrix_train_hours": per_epoch * protocol.epochs / 3600,
           f"epochs_in_{budget_hours:g}h_at_{jobs}_jobs": math.floor(budget_hours * 3600 * jobs
                                                                    / max(per_epoch, 1e-9)),
           "unmeasured_cells": sorted({r.cell for r in matrix(protocol, only)} - set(cells))}
    (RUNS / protocol.name).mkdir(parents=True, exist_ok=True)
    (RUNS / protocol.name / "measure.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"matrix at {protocol.epochs} epochs: {out['matrix_train_hours']:.1f} h of training "
          f"({out['matrix_train_hours'] / jobs:.1f} h wall at {jobs} jobs); "
          f"{out[f'epochs_in_{budget_hours:g}h_at_{jobs}_jobs']} epochs fit {budget_hours:g} h; "
          f"not measured: {out['unmeasured_cells'] or 'none'}")
    return out


# -- report ------------------------------------------------------------------------------------
# InfoPro (Wang et al., "Revisiting Locally Supervised Learning", ICLR 2021), Table 2: CIFAR-10
# test error (%), mean of 5 runs, 160 epochs; K = 2, 4, 8, 16. Shown as accuracy = 100 - error.
PUBLISHED_ERROR: dict[tuple[str, str], dict[int, float]] = {
    ("resnet32", "bp"): {1: 7.37},
    ("resnet32", "greedy"): {2: 10.30, 4: 16.07, 8: 21.19, 16: 24.59},
    ("resnet32", "dgl"): {2: 8.69, 4: 11.48, 8: 14.17, 16: 16.21},
    ("resnet32", "infopro_softmax"): {2: 8.13, 4: 8.64, 8: 11.40, 16: 14.23},
    ("resnet32", "infopro"): {2: 7.76, 4: 8.58, 8: 11.13, 16: 12.75},
    ("resnet110", "bp"): {1: 6.50},
    ("resnet110", "dgl"): {2: 7.70, 4: 10.50, 8: 12.46, 16: 13.80},
    ("resnet110", "infopro"): {2: 6.42, 4: 7.30, 8: 8.93, 16: 9.90},
}
OTHER_PUBLISHED = (
    "Not in InfoPro's table, and at other budgets, so not put beside our cells: MAN (Su et al., "
    "ECCV 2024) reports ResNet-32 K=16 error 9.11 with DGL+MAN vs E2E 6.37 at 400 epochs; "
    "AugLocal (Ma et al., ICLR 2024) ResNet-110 layer-wise 93.96% vs BP 94.61% at 400 epochs "
    "(both from secondary sources: check before quoting); GN-DGL (Patel et al. 2023) ResNet-32 "
    "G=2 K=1 about 91.4% vs BP about 93%.")


def published_acc(model: str, method: str, k: int) -> float | None:
    err = PUBLISHED_ERROR.get((model, method), {}).get(k)
    return None if err is None else round(100 - err, 2)


def collect(runs: Path = RUNS, protocols: Iterable[str] = REPORTED) -> list[dict[str, Any]]:
    """The results rows of every finished run of ``protocols``, in matrix order."""
    rows = []
    for name in protocols:
        for r in matrix(PROTOCOLS[name]):
            row = result_row(r, runs)
            if row is not None and row["epochs"] >= PROTOCOLS[name].epochs:
                rows.append(row)
    return rows


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))


def grouped(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, int], list[dict[str, Any]]]:
    """Rows by (protocol, model, method, K), in first-seen order."""
    out: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault((row["protocol"], row["model"], row["method"], row["k"]), []).append(row)
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    """results.md: InfoPro's table (issue 15), then a section per seeds claim (issue 17)."""
    info = [r for r in rows if not r.get("claim")]
    claims = [r for r in rows if r.get("claim")]
    text = infopro_markdown(info)
    if claims or any(p.claim for p in PROTOCOLS.values()):
        text += "\n" + seeds_markdown(claims)
    return text


def infopro_markdown(rows: list[dict[str, Any]]) -> str:
    """mean ± std per (method, K) beside InfoPro's Table 2, gaps to BP in points."""
    if not rows:
        return "# Reproduce: results\n\nNo run of the cpu or full protocol has finished yet.\n"
    groups = grouped(rows)
    out = ["# Reproduce: results", "",
           "CIFAR-10 test accuracy (%), mean ± std over seeds (n), final epoch; `best` is the "
           "best epoch's. Published: InfoPro (Wang et al., ICLR 2021) Table 2, 100 - error, "
           "160 epochs, batch 1024, full width, mean of 5 runs. Gaps are to BP of the same "
           "protocol and model, in points. Our CIFAR-10 is the JPEG re-encoding in shared/data.",
           ""]
    for protocol, model in dict.fromkeys((p, m) for p, m, _, _ in groups):
        bp = groups.get((protocol, model, "bp", 1))
        bp_mean = mean_std([r["final_acc"] for r in bp])[0] if bp else None
        p = PROTOCOLS[protocol]
        width = "" if p.width is None else f", width {p.width:g}"
        out += [f"## {protocol}: {model}{width}, {p.epochs} epochs, batch {p.batch}, lr {p.lr:g}", "",
                "| method | K | n | acc % | best % | gap to BP | published % | published gap "
                "| train h / run | saved act MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for (pr, mo, method, k), rs in groups.items():
            if (pr, mo) != (protocol, model):
                continue
            mean, std = mean_std([r["final_acc"] for r in rs])
            spread = f" ± {std:.2f}" if len(rs) > 1 else ""
            best = mean_std([r["best_acc"] for r in rs if r["best_acc"] is not None] or [math.nan])[0]
            pub, pub_bp = published_acc(model, method, k), published_acc(model, "bp", 1)
            gap = "" if method == "bp" or bp_mean is None else f"{mean - bp_mean:+.2f}"
            pub_gap = "" if method == "bp" or pub is None or pub_bp is None else f"{pub - pub_bp:+.2f}"
            hours = mean_std([r["train_seconds"] / 3600 for r in rs])[0]
            saved = max((r["saved_bytes_peak"] or 0) for r in rs) / 2**20
            out.append(f"| {method} | {k} | {len(rs)} | {mean:.2f}{spread} | {best:.2f} | {gap} "
                       f"| {'' if pub is None else f'{pub:.2f}'} | {pub_gap} | {hours:.2f} "
                       f"| {saved:.1f} |")
        out += ["", f"![accuracy vs K]({plot_name(protocol, model)})", ""]
    return "\n".join(out + [OTHER_PUBLISHED, ""])


def plot_name(protocol: str, model: str) -> str:
    return f"acc_vs_k_{protocol}_{model}.png"


def plot(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per (protocol, model): accuracy vs K per method, BP and published dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    groups, paths = grouped(rows), []
    for protocol, model in dict.fromkeys((p, m) for p, m, _, _ in groups):
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in dict.fromkeys(m for p, mo, m, _ in groups if (p, mo) == (protocol, model)):
            cells = sorted((k, mean_std([r["final_acc"] for r in rs]))
                           for (p, mo, m, k), rs in groups.items()
                           if (p, mo, m) == (protocol, model, method))
            if method == "bp":
                ax.axhline(cells[0][1][0], color="black", label="bp (ours)")
                pub_bp = published_acc(model, "bp", 1)
                if pub_bp is not None:
                    ax.axhline(pub_bp, color="black", ls="--", alpha=0.6, label="bp (InfoPro T2)")
                continue
            line = ax.errorbar([k for k, _ in cells], [ms[0] for _, ms in cells],
                               yerr=[ms[1] for _, ms in cells], marker="o", capsize=3, label=method)
            pub = sorted(PUBLISHED_ERROR.get((model, method), {}).items())
            if pub:
                ax.plot([k for k, _ in pub], [100 - e for _, e in pub], ls="--",
                        color=line[0].get_color(), alpha=0.6, label=f"{method} (InfoPro T2)")
        ax.set(xscale="log", xlabel="K (stages)", ylabel="test accuracy (%)",
               title=f"{model}, protocol {protocol}")
        ax.set_xticks([2, 4, 8, 16], ["2", "4", "8", "16"])
        ax.xaxis.set_minor_locator(NullLocator())
        paths.append(save_figure(fig, ax, out_dir / plot_name(protocol, model)))
    return paths


def save_figure(fig: Any, ax: Any, path: Path) -> Path:
    """Grid, legend, tight layout; write ``path`` (PNG, 100 dpi) and close the figure."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- report: the seeds' claims (issue 17) -----------------------------------------------------
# Published figures beside our cells: (claim, model, method, K) -> (accuracy %, source).
PUBLISHED_SEEDS: dict[tuple[str, str, str, int], tuple[float, str]] = {
    ("groups", "vgg6a", "dgl", 4): (92.25, "Patel et al. 2023"),
    ("groups", "vgg6a", "gn2", 4): (91.63, "Patel et al. 2023"),
    ("groups", "vgg6a", "gn4", 4): (90.55, "Patel et al. 2023"),
    ("groups", "vgg6a", "gn8", 4): (89.07, "Patel et al. 2023"),
    ("contsup", "resnet32", "bp", 1): (92.63, "InfoPro T2"),
    ("contsup", "resnet32", "dgl", 8): (85.83, "InfoPro T2"),
    ("contsup", "resnet32", "dgl", 16): (83.79, "InfoPro T2"),
    ("scpl-text", "lstm", "scpl", 4): (89.84, "Ho 2023, IMDB, model unspecified"),
    ("scpl-text", "transformer", "scpl", 4): (89.84, "Ho 2023, IMDB, model unspecified"),
}
CLAIMS: dict[str, tuple[str, str]] = {  # claim -> (title, goal and published context)
    "scpl-vision": ("1. SCPL vs BP, vision (VGG8, ResNet-18, CIFAR-10)",
                    "Goal: SCPL within 1 point of BP. The thesis (Ho 2023) presents SCPL as a BP "
                    "alternative at 200 epochs, batch 1024; no CIFAR-10 figure of it is at hand "
                    "here (METHODS.md §4 quotes Tiny-ImageNet 48.95%), so only the gap is compared."),
    "scpl-ablation": ("1b. SCPL ablations (VGG8, one knob each, seed 0)",
                      "Which knob of the SCPL recipe the gap to BP comes from: weak augmentation, a "
                      "linear projector, tau 0.5, batch 1024, a CE classifier on every stage."),
    "scpl-text": ("2. SCPL vs BP, text (LSTM, Transformer; IMDB len 350, SST-2 len 15)",
                  "Goal: BP and SCPL within 2 points of the thesis' IMDB 89.84% (model not "
                  "stated), SCPL within 1 point of BP."),
    "dascpl": ("3. DASCPL: early exit and dynamic layer accumulation (VGG8)",
               "Goals: per-sample early exit saves >= 30% of inference MACs within 1 point of the "
               "full network; `grow` within 1 point of the full network (dascpl) at fewer "
               "training MACs. Early exit: max-softmax confidence, the cheapest threshold within "
               "1 point (`locallearn eval RUN --exit`)."),
    "groups": ("4. Neuron groups (GN-DGL, VGG6a, K=4)",
               "Goal: the published ordering, plain groups losing accuracy as G grows and "
               "stop-gradient + diversity recovering most of it; `_wide` (plain groups with heads "
               "of the stop-gradient heads' size) separates information from head capacity. "
               "Published (Patel et al. 2023, VGG6a, full width and training): DGL 92.25; "
               "G = 2/4/8 plain 91.63/90.55/89.07; at G=6 89.8 plain, 90.57 with diversity, "
               "91.9 with stop-gradient + diversity."),
    "contsup": ("5. Context supply (ContSup, ResNet-32, K = 8, 16)",
                "Goal: the gap to BP at least halved at K=16 within +10% saved-activation bytes "
                "(of plain K=16). Published beside: InfoPro T2 (BP, DGL); ContSup's own table "
                "(Yu et al. 2024) is not quoted in METHODS.md."),
    "selfsup": ("6. Local SimCLR with depth-increasing difficulty (VGG6a, K=4)",
                "Goal: first a budget at which e2e SimCLR clearly beats constant local SimCLR in "
                "the last stage's linear probe, then the schedule closing >= 50% of that gap. The "
                "thesis (Patel 2023) gives no figures, only that the schedule matched e2e."),
}


def _stat(values: Sequence[float | None], digits: int = 2) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    mean, std = mean_std(vals)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(vals) > 1 else "")


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _per_stage(rs: Sequence[Mapping[str, Any]], key: str, digits: int = 1) -> str:
    """The mean over seeds of a per-stage list field, as ``a / b / c``."""
    lists = [r[key] for r in rs if r.get(key)]
    if not lists:
        return "-"
    return " / ".join(f"{sum(v) / len(v):.{digits}f}" for v in zip(*lists))


def score(row: Mapping[str, Any]) -> float | None:
    """A row's accuracy: the test accuracy, or for self-supervised runs the last stage's probe."""
    if row.get("claim") == "selfsup":
        return (row.get("probe_acc") or [None])[-1]
    return row.get("final_acc")


def _gap(value: float | None, ref: float | None) -> str:
    return "" if value is None or ref is None else f"{value - ref:+.2f}"


def _share(value: float | None, low: float | None, high: float | None) -> str:
    """How much of the gap from ``low`` to ``high`` ``value`` closes, as ``60 %``."""
    if value is None or low is None or high is None or high == low:
        return ""
    return f"{100 * (value - low) / (high - low):.0f} %"


def group_of(method: str) -> tuple[int, str]:
    """(G, variant) of a groups-claim method: ``gn4_sgdiv`` -> (4, "sgdiv"), ``dgl`` -> (1, "")."""
    if not method.startswith("gn"):
        return 1, ""
    g, _, variant = method[2:].partition("_")
    return int(g), variant or "none"


def seeds_markdown(rows: list[dict[str, Any]]) -> str:
    """One section per claim (in CLAIMS' order): budget, goal, a table, a plot; `not run yet`
    where no run of it has finished."""
    out = ["# The seeds' own claims (issue 17)", "",
           "Mean ± std over seeds (n) of the final epoch's test accuracy; gaps are to BP (the "
           "claim's baseline) of the same protocol and model, in points. Budgets and why: "
           "README.md. Our CIFAR-10 is the JPEG re-encoding in shared/data.", ""]
    for claim, (title, goal) in CLAIMS.items():
        protocols = [p for p in PROTOCOLS.values() if p.claim == claim]
        out += [f"## {title}", "", goal, ""]
        for p in protocols:
            width = "" if p.width is None else f", width {p.width:g}"
            out.append(f"- `{p.name}`: {', '.join(p.models)}{width}, {p.epochs} epochs, batch "
                       f"{p.batch}, lr {p.lr:g}, {len(matrix(p))} runs")
        out.append("")
        mine = [r for r in rows if r.get("claim") == claim]
        if not mine:
            out += ["Not run yet.", ""]
            continue
        out += CLAIM_TABLES.get(claim, _table_plain)(mine) + [""]
        if claim in CLAIM_PLOTS:
            out += [f"![{claim}]({claim_plot_name(claim)})", ""]
    return "\n".join(out)


def _by_cell(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str, int], list[dict[str, Any]]]:
    return grouped(list(rows))


def _baseline(groups: Mapping[tuple[str, str, str, int], list[dict[str, Any]]], protocol: str,
              model: str) -> float | None:
    base = PROTOCOLS[protocol].baseline
    rs = next((v for (p, m, meth, _), v in groups.items() if (p, m, meth) == (protocol, model, base)),
              [])
    return _mean([score(r) for r in rs])


def _table_plain(rows: Sequence[dict[str, Any]]) -> list[str]:
    """SCPL vs BP (vision, text, ablations): accuracy, gap, published, stage accuracy."""
    groups = _by_cell(rows)
    out = ["| protocol | model | method | K | n | acc % | best % | gap to BP | published % "
           "| stage acc % | train h / run |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (protocol, model, method, k), rs in groups.items():
        claim = rs[0]["claim"]
        pub = PUBLISHED_SEEDS.get((claim, model, method, k))
        pub_text = f"{pub[0]:.2f} ({pub[1]})" if pub and (claim != "scpl-text" or
                                                          rs[0]["data"] == "imdb") else ""
        acc = _mean([score(r) for r in rs])
        gap = "" if method == PROTOCOLS[protocol].baseline else _gap(acc, _baseline(groups, protocol, model))
        out.append(f"| {protocol} | {model} | {method} | {k} | {len(rs)} | "
                   f"{_stat([score(r) for r in rs])} | {_stat([r['best_acc'] for r in rs])} | {gap} | "
                   f"{pub_text} | {_per_stage(rs, 'stage_acc')} | "
                   f"{_stat([(r['train_seconds'] or 0) / 3600 for r in rs])} |")
    return out


def _table_dascpl(rows: Sequence[dict[str, Any]]) -> list[str]:
    groups = _by_cell(rows)
    out = ["| method | n | acc % | gap to BP | stage acc % | train MACs % | early exit within 1 pt: "
           "acc % @ MACs % | MACs saved % | fixed shortcut acc % @ MACs % |",
           "|---|---|---|---|---|---|---|---|---|"]
    full = {}
    for (protocol, model, method, _), rs in groups.items():
        acc = _mean([score(r) for r in rs])
        full[method] = acc
        exits = [r["exit"] for r in rs if r.get("exit")]
        bests = [e["best"] for e in exits if e.get("best")]
        best = (f"{_stat([b['acc'] for b in bests])} @ {_stat([100 * b['macs_fraction'] for b in bests], 1)}"
                if bests else ("none" if exits else "-"))
        saved = _stat([100 * (1 - b["macs_fraction"]) for b in bests], 1) if bests else "-"
        fixed = " / ".join(f"{f['stage']}: {f['acc']:.1f} @ {100 * f['macs_fraction']:.0f}"
                           for f in exits[0]["fixed"]) if exits else "-"
        frac = _mean([r.get("train_macs_fraction") for r in rs])
        gap = "" if method == "bp" else _gap(acc, _baseline(groups, protocol, model))
        out.append(f"| {method} | {len(rs)} | {_stat([score(r) for r in rs])} | {gap} | "
                   f"{_per_stage(rs, 'stage_acc')} | {'100' if frac is None else f'{100 * frac:.0f}'} "
                   f"| {best} | {saved} | {fixed} |")
    grow_gap = _gap(full.get("dascpl_grow"), full.get("dascpl"))
    if grow_gap:
        out += ["", f"grow vs the full network (dascpl): {grow_gap} points (goal: within 1)."]
    return out


def _table_groups(rows: Sequence[dict[str, Any]]) -> list[str]:
    groups = _by_cell(rows)
    out = ["| method | G | variant | n | acc % | ens 2^k % | gap to DGL | gap to BP | largest node "
           "MMACs | published % |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (protocol, model, method, k), rs in groups.items():
        acc = _mean([score(r) for r in rs])
        dgl = _mean([score(r) for r in groups.get((protocol, model, "dgl", 4), [])])
        g, variant = group_of(method) if method != "bp" else (0, "")
        pub = PUBLISHED_SEEDS.get(("groups", model, method, k))
        out.append(f"| {method} | {g or ''} | {variant} | {len(rs)} | {_stat([score(r) for r in rs])} "
                   f"| {_stat([r.get('ens_weighted') for r in rs])} | "
                   f"{'' if method in ('dgl', 'bp') else _gap(acc, dgl)} | "
                   f"{'' if method == 'bp' else _gap(acc, _baseline(groups, protocol, model))} | "
                   f"{_stat([(r.get('largest_node_macs') or 0) / 1e6 for r in rs])} | "
                   f"{'' if pub is None else f'{pub[0]:.2f}'} |")
    return out


def _table_contsup(rows: Sequence[dict[str, Any]]) -> list[str]:
    groups = _by_cell(rows)
    out = ["| method | K | n | acc % | gap to BP | share of plain's gap closed | saved act MiB "
           "| vs plain | published % |", "|---|---|---|---|---|---|---|---|---|"]
    for (protocol, model, method, k), rs in groups.items():
        acc, bp = _mean([score(r) for r in rs]), _baseline(groups, protocol, model)
        plain = groups.get((protocol, model, "dgl", k), [])
        plain_acc = _mean([score(r) for r in plain])
        saved = _mean([r.get("saved_bytes_peak") for r in rs])
        plain_saved = _mean([r.get("saved_bytes_peak") for r in plain])
        closed = "" if method in ("bp", "dgl") else _share(acc, plain_acc, bp)
        mem = ("" if method in ("bp", "dgl") or not saved or not plain_saved
               else f"{100 * (saved / plain_saved - 1):+.1f} %")
        pub = PUBLISHED_SEEDS.get(("contsup", model, method, k))
        out.append(f"| {method} | {k} | {len(rs)} | {_stat([score(r) for r in rs])} | "
                   f"{'' if method == 'bp' else _gap(acc, bp)} | {closed} | "
                   f"{'-' if saved is None else f'{saved / 2**20:.1f}'} | {mem} | "
                   f"{'' if pub is None else f'{pub[0]:.2f}'} |")
    return out


def _table_selfsup(rows: Sequence[dict[str, Any]]) -> list[str]:
    groups = _by_cell(rows)
    out = ["| method | n | last-stage probe % | gap to e2e | share of const's gap closed | "
           "probe acc % per stage | effective rank per stage |", "|---|---|---|---|---|---|---|"]
    e2e = const = None
    for (_, _, method, _), rs in groups.items():
        if method == "simclr_e2e":
            e2e = _mean([score(r) for r in rs])
        if method == "simclr_const":
            const = _mean([score(r) for r in rs])
    for (_, _, method, _), rs in groups.items():
        acc = _mean([score(r) for r in rs])
        closed = "" if method != "simclr_sched" else _share(acc, const, e2e)
        out.append(f"| {method} | {len(rs)} | {_stat([score(r) for r in rs])} | "
                   f"{'' if method == 'simclr_e2e' else _gap(acc, e2e)} | {closed} | "
                   f"{_per_stage(rs, 'probe_acc')} | {_per_stage(rs, 'effective_rank', 0)} |")
    return out


CLAIM_TABLES: dict[str, Callable[[Sequence[dict[str, Any]]], list[str]]] = {
    "dascpl": _table_dascpl, "groups": _table_groups, "contsup": _table_contsup,
    "selfsup": _table_selfsup}


def claim_plot_name(claim: str) -> str:
    return f"seeds_{claim}.png"


def _plot_acc_vs(ax: Any, rows: Sequence[dict[str, Any]], x_of: Callable[[dict[str, Any]], float],
                 line_of: Callable[[dict[str, Any]], str], base: str) -> None:
    """Mean ± std of ``score`` against ``x_of`` per line; the baseline as a horizontal line."""
    lines: dict[str, dict[float, list[float]]] = {}
    for r in rows:
        value = score(r)
        if value is not None and r["method"] != base:
            lines.setdefault(line_of(r), {}).setdefault(x_of(r), []).append(value)
    for label, points in lines.items():
        xs = sorted(points)
        stats = [mean_std(points[x]) for x in xs]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[sd for _, sd in stats], marker="o",
                    capsize=3, label=label)
    bp = [v for v in (score(r) for r in rows if r["method"] == base) if v is not None]
    if bp:
        ax.axhline(sum(bp) / len(bp), color="black", label=base)


def _constant(label: str) -> Callable[[dict[str, Any]], str]:
    return lambda _row: label


def plot_claim(claim: str, rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """The claim's plot (CLAIM_PLOTS) from its rows: accuracy vs G (groups), vs K (context
    supply), vs the MAC fraction (early exit), probe accuracy vs stage (local SimCLR)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    if claim == "groups":
        dgl = [r for r in rows if r["method"] == "dgl"]
        grouped_rows = [r for r in rows if r["method"].startswith("gn")]
        for variant in dict.fromkeys(group_of(r["method"])[1] for r in grouped_rows):
            _plot_acc_vs(ax, dgl + [r for r in grouped_rows if group_of(r["method"])[1] == variant],
                         lambda r: group_of(r["method"])[0], _constant(variant), "bp")
        pub = sorted((group_of(m)[0], v) for (c, _, m, _), (v, _) in PUBLISHED_SEEDS.items()
                     if c == "groups")
        if pub:
            ax.plot(*zip(*pub), "k--", alpha=0.5, label="published, plain (Patel 2023)")
        ax.set(xscale="log", xlabel="G (groups per stage; 1 = DGL)")
        ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    elif claim == "contsup":
        _plot_acc_vs(ax, rows, lambda r: r["k"], lambda r: r["method"], "bp")
        ax.set(xscale="log", xlabel="K (stages)")
        ax.set_xticks([8, 16], ["8", "16"])
    elif claim == "dascpl":
        for r in rows:
            if r.get("exit"):
                xs, ys = zip(*r["exit"]["curve"])
                ax.plot(xs, ys, marker=".", label=f"{r['method']} s{r['seed']}")
                fixed = r["exit"]["fixed"]
                ax.plot([f["macs_fraction"] for f in fixed], [f["acc"] for f in fixed], "s",
                        color=ax.lines[-1].get_color())
        ax.set(xlabel="fraction of the full network's MACs")
        ax.axvline(0.7, color="grey", ls=":", label="goal: 30 % saved")
    elif claim == "selfsup":
        for method in dict.fromkeys(r["method"] for r in rows):
            probes = [r["probe_acc"] for r in rows if r["method"] == method and r.get("probe_acc")]
            if probes:
                stats = [mean_std(list(v)) for v in zip(*probes)]
                ax.errorbar(range(1, len(stats) + 1), [m for m, _ in stats],
                            yerr=[sd for _, sd in stats], marker="o", capsize=3, label=method)
        ax.set(xlabel="stage")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(ylabel="test accuracy (%)" if claim != "selfsup" else "linear-probe accuracy (%)",
           title=CLAIMS[claim][0])
    return save_figure(fig, ax, path)


CLAIM_PLOTS = ("groups", "contsup", "dascpl", "selfsup")


def report(runs: Path = RUNS, out_dir: Path = HERE, protocols: Iterable[str] = REPORTED) -> str:
    """Re-render results.json, results.md and the plots from the run folders."""
    rows = collect(runs, protocols)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = markdown(rows)
    (out_dir / "results.md").write_text(text)
    info = [r for r in rows if not r.get("claim")]
    if info:
        plot(info, out_dir)
    for claim in CLAIM_PLOTS:
        mine = [r for r in rows if r.get("claim") == claim]
        if mine:
            plot_claim(claim, mine, out_dir / claim_plot_name(claim))
    return text


# -- command line ------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--protocol", choices=[*PROTOCOLS, *GROUPS], default="cpu",
                   help="a protocol, or a group of them (seeds: every claim of issue 17)")
    p.add_argument("--only", nargs="+", default=[], metavar="METHOD/K/SEED",
                   help="only these runs (shell wildcards, e.g. 'dgl/*/0'; MODEL/METHOD/K/SEED too)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--threads", type=int, default=1, help="engine.threads of each run")
    p.add_argument("--device", default="auto",
                   help="engine.device of fresh runs (auto: cuda if torch sees a GPU, else cpu)")
    p.add_argument("--status", action="store_true", help="done, running, left; time spent and needed")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--report", action="store_true", help="re-render results.* from the run folders")
    p.add_argument("--measure", type=int, default=0, metavar="STEPS",
                   help="time STEPS optimizer steps of each cell; write runs/<protocol>/measure.json")
    a = p.parse_args(argv)
    if a.protocol in GROUPS:
        return run_group(a)
    protocol = PROTOCOLS[a.protocol]
    if a.device == "auto":
        import torch

        a.device = "cuda" if torch.cuda.is_available() else ""
    plan = matrix(protocol, _filter(a.only))
    smoke = protocol.name not in REPORTED  # its report stays in its (ignored) run folder

    def rerender() -> None:
        if smoke:
            report(RUNS, RUNS / protocol.name, [protocol.name])
        else:
            report()

    if a.report:
        rerender()
        print((RUNS / protocol.name / "results.md" if smoke else HERE / "results.md").read_text())
        return 0
    if a.status:
        print_status(status(protocol, a.only, jobs=a.jobs), a.jobs)
        return 0
    check_plan(protocol, plan)
    if a.measure:
        measure(protocol, a.measure, a.only, a.threads, a.device)
        return 0
    if a.dry_run:
        print_dry_run(plan, a.threads, a.device)
        return 0
    # SIGTERM (`kill <pid>`) and SIGINT, even in the background, stop the runs like Ctrl-C
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    failures = advance(plan, RUNS, a.jobs, a.threads, a.device, rerender)
    rerender()
    print_status(status(protocol, a.only, jobs=a.jobs), a.jobs)
    return 1 if failures else 0



def check_plan(protocol: Protocol, plan: Sequence[Run]) -> None:
    """Refuse the protocol's keys and every (model, method, K) of ``plan`` the library lacks."""
    check_protocol_keys(protocol)
    for model, method, k in dict.fromkeys((r.model, r.method, r.k) for r in plan):
        check_method(method, protocol, k, model)


def group_plan(names: Sequence[str], only: Sequence[str] = ()) -> list[Run]:
    """The runs of several protocols in order, each folder once (a borrowed cell is trained by
    the first protocol that plans it)."""
    plan = [r for name in names for r in matrix(PROTOCOLS[name], only)]
    return list({r.folder(): r for r in reversed(plan)}.values())[::-1]


def run_group(a: argparse.Namespace) -> int:
    """``--protocol seeds``: status, dry run, measure, report or training of every protocol of
    the group, in the group's order."""
    names = GROUPS[a.protocol]
    if a.report:
        print(report())
        return 0
    if a.status:
        for name in names:
            print_status(status(PROTOCOLS[name], a.only, jobs=a.jobs), a.jobs)
        return 0
    if a.device == "auto":
        import torch

        a.device = "cuda" if torch.cuda.is_available() else ""
    for name in names:
        check_plan(PROTOCOLS[name], matrix(PROTOCOLS[name], _filter(a.only)))
    if a.measure:
        for name in names:
            measure(PROTOCOLS[name], a.measure, a.only, a.threads, a.device)
        return 0
    plan = group_plan(names, a.only)
    if a.dry_run:
        print_dry_run(plan, a.threads, a.device)
        return 0
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    failures = advance(plan, RUNS, a.jobs, a.threads, a.device, rerender_all)
    report()
    for name in names:
        print_status(status(PROTOCOLS[name], a.only, jobs=a.jobs), a.jobs)
    return 1 if failures else 0


def rerender_all() -> None:
    """Re-render results.* of every reported protocol (after each finished run)."""
    report()


def print_dry_run(plan: Sequence[Run], threads: int, device: str) -> None:
    """Each run's state and, for what is left to do, its command."""
    for r in plan:
        s = state(r)
        print(f"# {r.protocol.name}/{r.name}: {s}" + (f" (folder of {r.folder().parent.name})"
                                                      if r.folder().parent.name != r.protocol.name else ""))
        if s not in ("done", "running"):
            print(" ".join(f"'{c}'" if " " in c or "{" in c else c
                           for c in command(r, threads=threads, device=device)))


if __name__ == "__main__":
    sys.exit(main())
