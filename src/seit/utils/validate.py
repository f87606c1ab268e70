"""Config values that cannot work, refused with the key named before any work starts.

Without these checks a zero batch size fails deep in a sampler, ``max_epochs=0`` ends "successfully"
without training, and a negative learning rate trains uphill. One function per part of the config;
``seit.pipelines.run_task`` calls the ones each task reads.
"""

from __future__ import annotations

import math
from numbers import Real

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    pass


DATA_HINT = {"tokens": "a token data config such as data=mnist5k", "images": "data=images_mnist5k or another data=images_*"}



def _get(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        if node is None or part not in node:
            return None
        node = node[part]
    return node


def _number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _int(cfg: DictConfig, key: str, *, minimum: int, optional: bool = False, also: tuple = ()) -> None:
    value = _get(cfg, key)
    if value is None and optional or value in also:
        return
    if not (_number(value) and float(value).is_integer() and value >= minimum):
        extra = "".join(f" or {a}" for a in also)
        raise ConfigError(f"{key}={value!r}: must be an integer >= {minimum}{extra}")


def _real(cfg: DictConfig, key: str, *, low: float, high: float = math.inf, low_open: bool = False,
          high_open: bool = False, optional: bool = False) -> None:
    value = _get(cfg, key)
    if value is None and optional:
        return
    ok = _number(value) and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if high == math.inf:
            raise ConfigError(f"{key}={value!r}: must be a number {'>' if low_open else '>='} {low:g}")
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{key}={value!r}: must be a number in {interval}")


def check_data(cfg: DictConfig) -> None:
    """The loader: batch sizes, workers, the shuffle buffer, the image size."""
    _int(cfg, "data.batch_size", minimum=1)
    _int(cfg, "data.eval_batch_size", minimum=1)
    _int(cfg, "data.num_workers", minimum=0)
    _int(cfg, "data.shuffle_buffer", minimum=0, optional=True)
    _int(cfg, "data.image_size", minimum=1, optional=True)


def check_build(cfg: DictConfig) -> None:
    """How a token dataset is built (task=tokenize, or before training when it is missing)."""
    if _get(cfg, "data.build") is None:
        return
    _int(cfg, "data.build.shard_size", minimum=1)
    _int(cfg, "data.build.chunk_size", minimum=1)
    _int(cfg, "data.build.workers", minimum=0)


def check_trainer(cfg: DictConfig) -> None:
    """How long and how often: at least one epoch or step, and at least one batch in it."""
    _int(cfg, "trainer.max_epochs", minimum=1, optional=True, also=(-1,))
    _int(cfg, "trainer.max_steps", minimum=1, optional=True, also=(-1,))
    for key, minimum in (("trainer.limit_train_batches", 0), ("trainer.limit_val_batches", -1)):
        value = _get(cfg, key)  # a fraction of the loader, or a number of batches (0 val batches: no validation)
        if value is not None and not (_number(value) and value > minimum and (value <= 1 or float(value).is_integer())):
            raise ConfigError(f"{key}={value!r}: must be a fraction in (0, 1] or a whole number of batches"
                              + (" >= 1" if minimum == 0 else " >= 0"))
    _int(cfg, "trainer.check_val_every_n_epoch", minimum=1, optional=True)
    _int(cfg, "trainer.log_every_n_steps", minimum=1, optional=True)
    _int(cfg, "trainer.accumulate_grad_batches", minimum=1, optional=True)
    _real(cfg, "trainer.gradient_clip_val", low=0, optional=True)  # 0: no clipping
    from seit.utils.budget import duration_seconds

    for key in ("trainer.max_time", "callbacks.budget.val_every"):  # "DD:HH:MM:SS" or seconds
        try:
            duration_seconds(_get(cfg, key), key)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def check_optim(cfg: DictConfig) -> None:
    """The learning rate and its schedule, and AdamW's constants."""
    _real(cfg, "optim.lr", low=0, low_open=True, optional=True)
    _real(cfg, "optim.blr", low=0, low_open=True, optional=True)
    _int(cfg, "optim.base_batch", minimum=1, optional=True)
    _real(cfg, "optim.weight_decay", low=0, optional=True)
    _real(cfg, "scheduler.warmup_epochs", low=0, optional=True)
    _real(cfg, "scheduler.warmup_fraction", low=0, high=1, optional=True)
    _int(cfg, "scheduler.max_warmup_steps", minimum=0, optional=True)
    _real(cfg, "scheduler.min_lr", low=0, optional=True)
    _real(cfg, "optim.eps", low=0, low_open=True, optional=True)
    _real(cfg, "optim.layer_decay", low=0, high=1, low_open=True, optional=True)
    betas = _get(cfg, "optim.betas")
    if betas is not None and not (len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"optim.betas={list(betas)!r}: must be two numbers in [0, 1)")
    horizon = _get(cfg, "scheduler.horizon")
    if horizon is not None and horizon not in ("epochs", "budget"):
        raise ConfigError(f"scheduler.horizon={horizon!r}: must be epochs or budget")
    if horizon == "budget" and _get(cfg, "trainer.max_time") is None:
        raise ConfigError("scheduler.horizon=budget runs the cosine over the time budget: set trainer.max_time "
                          "(DD:HH:MM:SS or seconds)")
    scaling = _get(cfg, "optim.lr_scaling")
    if scaling is not None and scaling not in ("linear", "sqrt"):
        raise ConfigError(f"optim.lr_scaling={scaling!r}: must be linear or sqrt")


def check_task_settings(cfg: DictConfig) -> None:
    """Settings several objectives share, where a task has them."""
    _real(cfg, "task.label_smoothing", low=0, high=1, high_open=True, optional=True)
    _real(cfg, "task.ema_decay", low=0, high=1, high_open=True, optional=True)


def check_task_inputs(cfg: DictConfig) -> None:
    """What a task needs before it starts: its mandatory (???) values, its kind of data, its tokenizer."""
    name = cfg.task.name
    scopes = [("task", True), ("data", False)]  # data.build's values matter only when the data is missing
    if name == "curate" and cfg.get("curate") is not None:
        scopes.append(("curate", True))
    for prefix, deep in scopes:
        for key in _missing(OmegaConf.to_container(cfg[prefix], resolve=False), prefix, deep):
            raise ConfigError(f"task={name} needs {key}=<value> (it is ??? in the config)")
    kind = _data_kind(cfg.task.get("_target_"))
    if kind is not None and cfg.data.kind != kind:
        raise ConfigError(f"task={name} learns from {kind}, not data.kind={cfg.data.kind!r}: use {DATA_HINT[kind]}")
    for old in ("tokenizer.embed_dim", "tokenizer.model.embed_dim"):  # set by +key=... or a config file of one's own
        if _get(cfg, old) is not None:
            new = old.replace("embed_dim", "codebook_dim")
            raise ConfigError(f"{old} is now {new} (the codebook's width D; embed_dim is only the ViT's, "
                              f"model.embed_dim): set {new} instead")
    if name == "train_tokenizer" and "model" not in cfg.tokenizer:
        raise ConfigError(f"task=train_tokenizer trains a VQ tokenizer: add tokenizer=vq (or tokenizer=vq_patch); "
                          f"tokenizer={cfg.tokenizer.get('kind')} is fitted by task=tokenize")


def locate(path: str, key: str):
    """The object a dotted import path names (``package.module.Name``), or a one-line ConfigError
    naming the config ``key`` (Hydra's own lookup logs a multi-line error first)."""
    import importlib

    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{key}={path}: cannot import it ({type(e).__name__}: {e})") from None


def _data_kind(target: str | None) -> str | None:
    """The representation the task's LightningModule learns from (its ``data_kind``), if it says."""
    if not target:
        return None
    return getattr(locate(target, "task._target_"), "data_kind", None)


def _missing(node: dict, prefix: str, deep: bool) -> list[str]:
    found = []
    for key, value in node.items():
        if value == "???":
            found.append(f"{prefix}.{key}")
        elif deep and isinstance(value, dict):
            found += _missing(value, f"{prefix}.{key}", deep)
    return found
