"""What run.py dispatches to: one function per ``task.name``."""

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


def _convert(cfg):
    from seit.pipelines.convert import convert

    return convert(cfg)


TASKS = {"train": _train, "train_tokenizer": _train, "train_tokenadapt": _train, "pretrain_mtm": _train,
         "tokenize": _tokenize, "embed": _embed, "curate": _curate,
         "convert": _convert, "continual": _continual, "verify": _verify}
_FIT = (validate.check_task_inputs, validate.check_data, validate.check_build, validate.check_trainer,
        validate.check_optim)
# The config checks of each task: the parts of the config it reads.
CHECKS = {"train": (*_FIT, validate.check_classification), "continual": (*_FIT, validate.check_classification),
          "train_tokenizer": _FIT, "train_tokenadapt": _FIT, "pretrain_mtm": _FIT,
          "tokenize": (validate.check_task_inputs, validate.check_build),
          "embed": (validate.check_task_inputs, validate.check_build),
          "curate": (validate.check_task_inputs,), "convert": (validate.check_task_inputs,)}


def run_task(cfg: DictConfig):
    """Run the task, and always close the loggers (a multirun reuses the process)."""
    name = cfg.task.name
    if name not in TASKS:
        raise ValueError(f"unknown task.name {name!r}; known tasks: {sorted(TASKS)}")
    for check in CHECKS.get(name, ()):
        check(cfg)
    try:
        return TASKS[name](cfg)
    finally:
        _finish_wandb()


def _finish_wandb() -> None:
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
