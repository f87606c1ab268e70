"""What run.py dispatches to: one function per ``task.name``, and training for any task config that
names a LightningModule (``task._target_``): a new objective is a module plus a config, not an entry here."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from seit.utils import validate

log = logging.getLogger(__name__)


def _train(cfg):
    from seit.pipelines.train import train

    return train(cfg)


def _tokenize(cfg):
    from seit.pipelines.tokenize import tokenize

    return tokenize(cfg)


def _embed(cfg):
    from seit.pipelines.embed import embed

    return embed(cfg)


def _curate(cfg):
    from seit.pipelines.curate import curate

    return curate(cfg)


def _continual(cfg):
    from seit.pipelines.continual import continual

    return continual(cfg)


def _verify(cfg):
    from seit.pipelines.verify import verify

    return verify(cfg)


def _eval(cfg):
    from seit.pipelines.eval import evaluate

    return evaluate(cfg)


def _predict(cfg):
    from seit.pipelines.predict import predict

    return predict(cfg)


def _convert(cfg):
    from seit.pipelines.convert import convert

    return convert(cfg)


TASKS = {"tokenize": _tokenize, "embed": _embed, "curate": _curate, "convert": _convert, "continual": _continual,
         "verify": _verify, "eval": _eval, "predict": _predict}
# The config checks of each task: the parts of the config it reads (FIT: every training task).
FIT = (validate.check_task_inputs, validate.check_data, validate.check_build, validate.check_trainer,
       validate.check_optim, validate.check_task_settings)
CHECKS = {"continual": FIT,
          "tokenize": (validate.check_task_inputs, validate.check_build),
          "embed": (validate.check_task_inputs, validate.check_build),
          "curate": (validate.check_task_inputs,), "convert": (validate.check_task_inputs,),
          "eval": (validate.check_task_inputs, validate.check_build), "predict": (validate.check_task_inputs,)}


def is_fit(cfg: DictConfig) -> bool:
    """A training task: not a named pipeline, and its config names a LightningModule."""
    return cfg.task.name not in TASKS and "_target_" in cfg.task


def checks(cfg: DictConfig) -> tuple:
    """The config checks the task runs before any work."""
    return FIT if is_fit(cfg) else CHECKS.get(cfg.task.name, ())


def run_task(cfg: DictConfig):
    """Run the task, and always close the loggers (a multirun reuses the process)."""
    name, fit = cfg.task.name, is_fit(cfg)
    if name not in TASKS and not fit:
        raise ValueError(f"unknown task.name {name!r}; known tasks: {sorted(TASKS)}, or a task config with a "
                         "_target_ LightningModule to train")
    for check in checks(cfg):
        check(cfg)
    try:
        return _train(cfg) if fit else TASKS[name](cfg)
    finally:
        _finish_wandb()


def _finish_wandb() -> None:
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
