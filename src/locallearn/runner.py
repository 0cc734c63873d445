"""A whole run: one process, or the pipeline's worker processes.

This is the layer above the training loop that decides where a run trains:
:func:`run` builds a run from its config (data, net, run folder) and trains it here,
or hands it to the launcher (:mod:`locallearn.distributed.launch`) for
``engine=pipeline``; :class:`Trainer` is the loop's trainer whose ``fit`` does the
same for a net the user built in Python (``ll.Trainer(net, data, cfg).fit()``).
Nothing below this module imports the launcher.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from locallearn import loop, runs
from locallearn.build import build_data, build_net
from locallearn.config import RunConfig
from locallearn.errors import RunError

log = logging.getLogger("locallearn")


class Trainer(loop.Trainer):
    """The training loop (:class:`locallearn.loop.Trainer`), started where ``cfg`` says.

    With ``engine=pipeline`` (and no engine given) ``fit`` starts the worker processes:
    each rank trains the stages the config places on it, and the trained weights come
    back into ``net``; the user's own modules travel to the workers by pickling, so they
    must be defined at module level of an importable module or script (as Python
    multiprocessing requires). Otherwise it trains here.
    """

    def __init__(self, net: Any, data: Any, cfg: RunConfig, run_dir: Path | None = None,
                 engine: Any = None, **options: Any) -> None:
        self._workers = engine is None and cfg.engine.name == "pipeline" \
            and options.get("comm") is None
        if self._workers:  # the workers build their own engines; here only the run's shape
            self._args = (net, data, cfg, run_dir, options)
            self.net, self.data, self.cfg, self.run_dir = net, data, cfg, run_dir
            return
        super().__init__(net, data, cfg, run_dir, engine, **options)

    def fit(self) -> dict[str, Any]:
        if not self._workers:
            return super().fit()
        from locallearn.distributed.launch import train_in_workers

        net, data, cfg, run_dir, options = self._args
        return train_in_workers(net, data, cfg, run_dir, **options)


def run(cfg: RunConfig, resume: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """Run a whole training job from its config: data, model, engine, run folder.

    Args:
        cfg: the run configuration (for a resumed run: the saved config with the
            user's overrides applied, see :func:`locallearn.runs.resume_config`).
        resume: a run folder to continue from its last checkpoint.

    Returns:
        The run summary and the run folder.
    """
    from locallearn.distributed import under_torchrun

    if under_torchrun():  # every process is a worker; rank 0 makes the run folder
        from locallearn.distributed.launch import run_pipeline

        return run_pipeline(cfg, resume)
    cfg, run_dir = resolve_run(cfg, resume)
    with runs.claim(run_dir):
        try:
            return _run_here_or_in_workers(cfg, resume, run_dir)
        except KeyboardInterrupt:
            raise Interrupted(run_dir, len(runs.read_metrics(run_dir))) from None


def _run_here_or_in_workers(cfg: RunConfig, resume: str | Path | None,
                            run_dir: Path) -> tuple[dict[str, Any], Path]:
    if cfg.engine.name == "pipeline":  # worker processes: see locallearn.distributed.launch
        from locallearn.distributed.launch import run_pipeline

        return run_pipeline(cfg, resume, run_dir)
    state = runs.load_checkpoint(run_dir) if resume is not None else None
    if cfg.engine.threads:  # 0 keeps torch's default for a single process
        torch.set_num_threads(cfg.engine.threads)
    torch.manual_seed(cfg.train.seed)
    data = build_data(cfg)
    if "vocab" in data.meta:  # text: the encoder fitted on the train split, to encode new text
        runs.write_json(run_dir / "vocab.json", data.meta["vocab"])
    trainer = loop.Trainer(build_net(cfg, data), data, cfg, run_dir)
    if state is not None:
        trainer.load_state_dict(state)
        runs.truncate_metrics(run_dir, trainer.epoch)
        runs.save_config(run_dir, cfg)
    return trainer.fit(), run_dir


class Interrupted(RunError):
    """The user stopped a run (Ctrl-C); the message says what was saved and how to go on."""

    def __init__(self, run_dir: Path, epoch: int) -> None:
        saved = (f"the checkpoint of epoch {epoch} is in {run_dir}; continue with: "
                 f"locallearn train --resume {run_dir}") if epoch else \
            "no epoch had finished, so nothing was saved"
        super().__init__(f"stopped by the user (Ctrl-C) after {epoch} finished epoch"
                         f"{'' if epoch == 1 else 's'}: {saved}")


def resolve_run(cfg: RunConfig, resume: str | Path | None = None) -> tuple[RunConfig, Path]:
    """The config and a fresh folder of a new run, or the run that ``resume`` continues.

    A resumed run trains with ``cfg`` as given: callers build it from the saved config
    and the user's overrides (:func:`locallearn.runs.resume_config`).

    Raises:
        RunError: if ``resume`` is not a run folder with a checkpoint.
    """
    if resume is None:
        return cfg, runs.new_run_dir(cfg)
    run_dir = Path(resume)
    if not (run_dir / runs.CHECKPOINT).is_file():
        raise RunError(f"cannot resume {run_dir}: it holds no {runs.CHECKPOINT} "
                       f"(a run folder holds one after its first epoch)")
    return cfg, run_dir

