"""Every training task (``task=train``, ``pretrain_mtm``, ``train_tokenizer``, ``train_tokenadapt``, and any
task config naming a LightningModule): one path that does not know which objective it builds.

The data module is set up, what the data decides is read once (``data_facts``), and
``task._target_`` is instantiated with the other ``task.*`` keys and those facts; then one Lightning
fit with the configured trainer, callbacks and loggers, and one ``summary.json``.
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from seit.data.datamodule import TokenDataModule
from seit.data.dataset_info import storage_summary
from seit.data.image_datamodule import ImageFolderDataModule, input_grid
from seit.tasks.base import DataFacts, SeitTask
from seit.utils.budget import training_budget
from seit.utils.validate import locate
from seit.utils.visuals import time_curves_png
from seit.utils.summary import config_hash, finished_run, to_float, write_summary

log = logging.getLogger(__name__)
DATA_KINDS = ("tokens", "images")
REPORTED = ("val/acc1", "val/acc5", "val/loss", "val/mtm_acc", "val/knn_acc1", "val/psnr", "val/ssim")
RUN_KEYS = ("name", "metric", "global_batch")  # task.* keys the pipeline reads; the rest go to the module


def build_datamodule(cfg: DictConfig):
    kind = cfg.data.kind
    if kind == "tokens":
        from seit.pipelines.tokenize import prepare_token_dataset

        prepare_token_dataset(cfg)  # builds it when missing (data.build.source), else checks how it was built
        return TokenDataModule(cfg.data, seed=cfg.seed)
    if kind == "images":  # the loader-side part of the aug group: RandAugment and the repeat sampler
        aug = cfg.get("aug") or {}
        return ImageFolderDataModule(cfg.data, cache_dir=cfg.paths.cache_dir, auto_augment=aug.get("auto_augment"),
                                     repeated_aug=aug.get("repeated_aug", 1))
    raise ValueError(f"data.kind must be one of {DATA_KINDS}, got {kind!r}")


def data_facts(cfg: DictConfig, dm) -> dict:
    """What the data decides about a model, read once from the (set-up) data module: the task's ``data``."""
    facts = DataFacts(kind=cfg.data.kind, num_classes=int(dm.num_classes), input_grid=input_grid(dm),
                      batch_size=int(cfg.data.batch_size))
    if cfg.data.kind == "tokens":
        info = dm.load_info()
        facts.codebook_size, facts.codebook_dim = info.codebook_size, info.codebook_dim
        facts.codebook_sha256 = info.fingerprint
    return facts.as_dict()


def instantiate_task(task_cfg: DictConfig, data: dict, *, skip: tuple[str, ...] = (), **extra) -> SeitTask:
    """The LightningModule that ``task._target_`` names, given every other ``task.*`` key (but the
    pipeline's ``RUN_KEYS`` and ``skip``), the data's facts and ``extra``; its datamodule-held parts
    (codebook, synonyms, pre-trained weights) are installed by ``attach`` before fit."""
    args = OmegaConf.to_container(task_cfg, resolve=True)
    target = args.pop("_target_", None)
    if target is None:
        raise ValueError(f"task={task_cfg.get('name')} names no LightningModule (task._target_)")
    cls = locate(target, "task._target_")
    args = {k: v for k, v in args.items() if k not in RUN_KEYS + skip}
    accepted = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(args) - set(accepted))
        if unknown:
            raise ValueError(f"task.{unknown[0]} is not an argument of {target} (its arguments: "
                             f"{', '.join(k for k in accepted if k != 'self')})")
    return cls(**args, **extra, data=data)


def build_task(cfg: DictConfig, dm) -> SeitTask:
    task = instantiate_task(cfg.task, data_facts(cfg, dm))
    task.attach(dm)
    return task


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``last`` means this run dir's last.ckpt when there is one; a fresh dir starts from scratch.

    That makes ``ckpt_path=last`` safe to pass on every (re)launch: a requeued job resumes, a
    first launch trains from the start.
    """
    if ckpt_path != "last":
        return ckpt_path
    last = output_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("resuming from %s", last)
        return str(last)
    log.info("ckpt_path=last: no %s yet, starting from scratch", last)
    return None


def gather(value: int) -> list[int]:
    """One value per rank (just [value] without torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def instantiate_all(node: DictConfig | None) -> list:
    return [hydra.utils.instantiate(c) for c in (node or {}).values() if c is not None and "_target_" in c]


def train(cfg: DictConfig) -> dict:
    output_dir = Path(cfg.paths.output_dir)
    if (done := finished_run(output_dir, cfg)) is not None:
        return done
    pl.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    task = build_task(cfg, dm)
    if getattr(task, "needs_labels", False) and cfg.data.kind == "tokens":
        dm.check_labelled(cfg.data.train_split, cfg.data.val_split)
    from seit.data.fixed_batches import fixed_batches  # data.fixed_batches=N (debug=overfit): N batches only
    dm = fixed_batches(dm, cfg.data.get("fixed_batches"))
    callbacks = instantiate_all(cfg.get("callbacks"))
    budget = training_budget(callbacks, cfg.trainer.get("max_time"))  # the one training clock (+ max_time)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, max_time=None,  # the budget is the Timer
                                      logger=instantiate_all(cfg.get("logger")) or False)
    if cfg.task.get("global_batch"):  # reach the recipe's batch per step by accumulation
        per_step = int(cfg.data.batch_size) * trainer.world_size
        trainer.accumulate_grad_batches = max(1, round(int(cfg.task.global_batch) / per_step))
        log.info("global batch %d: %d per step x %d accumulated", cfg.task.global_batch, per_step,
                 trainer.accumulate_grad_batches)
    for lg in trainer.loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    start = time.perf_counter()
    trainer.fit(task, datamodule=dm, ckpt_path=resolve_ckpt_path(cfg.get("ckpt_path"), output_dir))
    if budget.needs_final_validation(trainer):  # stopped in an epoch that check_val_every_n_epoch skips
        trainer.validate(task, datamodule=dm, verbose=False)
    wall = time.perf_counter() - start
    train_s = budget.launch_train_seconds
    samples_per_rank = gather(budget.launch_samples)
    segments = budget.segments(wall)

    metrics = {k: to_float(v) for k, v in trainer.callback_metrics.items()}
    ckpt = trainer.checkpoint_callback
    summary = {
        "task": cfg.task.name,
        "metrics": {k: v for k, v in sorted(metrics.items()) if v is not None},
        "wall_s": round(sum(seg["wall_s"] for seg in segments), 3),  # every launch of the run (requeues too)
        "launch_wall_s": round(wall, 3),
        "segments": segments,
        "train_s": round(train_s, 3),  # this launch's training: validation and checkpoint writes excluded
        "world_size": trainer.world_size,
        "samples_seen": sum(samples_per_rank),
        "samples_seen_per_rank": samples_per_rank,
        "samples_per_s": round(sum(samples_per_rank) / train_s, 2) if train_s else None,
        "global_step": trainer.global_step,
        "config_hash": config_hash(cfg),
        "ckpt_path": (ckpt.best_model_path or ckpt.last_model_path) if ckpt else None,  # best by val/acc1
        "last_ckpt_path": ckpt.last_model_path if ckpt else None,
        "output_dir": str(output_dir),
        "budget": budget.report(),  # the whole run's clock, over all launches (train_s above: this launch)
        "curve": budget.curve,  # one point per validation: train_s, samples_seen, epoch, step, metrics
    }
    summary.update({k: summary["metrics"][k] for k in REPORTED if k in summary["metrics"]})
    if hasattr(task, "export") and trainer.is_global_zero:
        summary.update(task.export(output_dir))
    if cfg.data.kind == "tokens":
        summary["dataset"] = {"root": str(dm.load_info().root), **storage_summary(dm.load_info().meta)}
    if trainer.is_global_zero:
        if plotted := time_curves_png({"": budget.curve}, output_dir, budget.metric):
            summary["curve_png"] = str(plotted)
        write_summary(output_dir, summary)
        report(summary)
    return summary


def report(summary: dict) -> None:
    parts = [f"{k}={summary[k]:.4f}" for k in REPORTED if k in summary]
    parts.append(f"wall {summary['wall_s']:.1f}s")
    budget = summary.get("budget") or {}
    if budget.get("max_time_s") is not None:
        parts.append(f"train {budget['train_seconds']:.1f}s of a {budget['max_time_s']:g}s budget"
                     + (" (stopped by it)" if budget["stopped_by_budget"] else ""))
    if summary.get("samples_per_s"):
        parts.append(f"{summary['samples_per_s']:.0f} train samples/s")
    if "tokenizer_checkpoint" in summary:
        parts.append(f"tokenizer: {summary['tokenizer_checkpoint']}")
    if "dataset" in summary:
        d = summary["dataset"]
        storage = f"{d['bytes_per_sample']:.0f} B/sample"
        if "percent_of_source" in d:
            storage += f" ({d['percent_of_source']:.2f}% of the source image bytes)"
        parts.append(storage)
    print("final: " + ", ".join(parts), flush=True)
    print(f"summary: {Path(summary['output_dir']) / 'summary.json'}", flush=True)
