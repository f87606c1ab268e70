"""``task=train``: fit a classifier on a token dataset (or on images, for the pixel baseline)."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from seit.data.datamodule import TokenDataModule
from seit.data.dataset_info import storage_summary
from seit.data.image_datamodule import ImageFolderDataModule, input_grid
from seit.tasks.classification import ClassificationTask
from seit.tokenizers.codebook_tools import synonyms
from seit.utils.throughput import TrainThroughput
from seit.utils.summary import config_hash, finished_run, to_float, write_summary

log = logging.getLogger(__name__)
DATA_KINDS = ("tokens", "images")
REPORTED = ("val/acc1", "val/acc5", "val/loss", "val/mtm_acc", "val/psnr", "val/ssim")


def build_datamodule(cfg: DictConfig):
    kind = cfg.data.kind
    if kind == "tokens":
        return TokenDataModule(cfg.data, build_cfg=cfg, seed=cfg.seed)
    if kind == "images":
        return ImageFolderDataModule(cfg.data, cache_dir=cfg.paths.cache_dir)
    raise ValueError(f"data.kind must be one of {DATA_KINDS}, got {kind!r}")


def build_tokenizer_task(cfg: DictConfig, dm):
    from seit.tasks.tokenizer import TokenizerTask

    if cfg.data.kind != "images":
        raise ValueError(f"task=train_tokenizer trains on pixels: use an images data config (data=images_*), "
                         f"not data.kind={cfg.data.kind!r}")
    # The tokenizer steps its optimizers by hand; checkpoints holding the post-step state are what we want.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    t = cfg.task
    return TokenizerTask(vq=OmegaConf.to_container(cfg.tokenizer.model, resolve=True),
                         optim=OmegaConf.to_container(cfg.optim, resolve=True), image_size=int(cfg.tokenizer.image_size),
                         crop=t.crop, l1_weight=t.l1_weight, l2_weight=t.l2_weight,
                         perceptual_weight=t.perceptual_weight, perceptual_weights=t.perceptual_weights,
                         adv_weight=t.adv_weight, adv_start_step=t.adv_start_step, hflip=t.hflip,
                         compact=t.compact, init_from=t.get("init_from"))


def build_tokenadapt_task(cfg: DictConfig, dm):
    from seit.tasks.tokenadapt import TokenAdaptTask

    if cfg.data.kind != "images":
        raise ValueError("task=train_tokenadapt learns from pixels: use an images data config (data=images_*)")
    t = cfg.task
    task = TokenAdaptTask(tokenizer=str(t.tokenizer), out_grid=int(t.out_grid), geo=OmegaConf.to_container(t.geo),
                          optim=OmegaConf.to_container(cfg.optim, resolve=True), width=int(t.width),
                          heads=int(t.heads), seed=int(cfg.seed))
    if task.tokenizer.image_size != int(cfg.data.image_size):
        raise ValueError(f"data.image_size={cfg.data.image_size} must be the tokenizer's image size "
                         f"{task.tokenizer.image_size} ({t.tokenizer})")
    return task


def build_mtm_task(cfg: DictConfig, dm):
    """The encoder is ``model.*``, so a classifier from the same model group loads it."""
    from seit.tasks.mtm import MTMTask

    if cfg.data.kind != "tokens" or cfg.model.input != "tokens":
        raise ValueError("task=pretrain_mtm pre-trains on tokens: use a token data config and model.input=tokens")
    m, t = cfg.model, cfg.task
    info = dm.load_info()
    arch = {"embed_dim": m.embed_dim, "depth": m.depth, "num_heads": m.num_heads, "mlp_ratio": m.mlp_ratio,
            "dropout": m.token_dropout, **OmegaConf.to_container(t.decoder)}
    task = MTMTask(model=arch, mask=OmegaConf.to_container(t.mask), optim=OmegaConf.to_container(cfg.optim, resolve=True),
                   aug=OmegaConf.to_container(cfg.aug, resolve=True), input_grid=input_grid(dm),
                   batch_size=int(cfg.data.batch_size), codebook_size=info.codebook_size,
                   codebook_dim=int(info.meta.get("embed_dim", 32)), codebook_sha256=info.fingerprint,
                   smoothing=float(t.smoothing), seed=int(cfg.seed), soft_tau=float(t.get("soft_tau") or 0.0))
    task.load_codebook(info.load_codebook())
    if cfg.aug.tokenadapt.checkpoint:
        task.load_tokenadapt(cfg.aug.tokenadapt.checkpoint)
    return task


def build_task(cfg: DictConfig, dm):
    builders = {"train_tokenizer": build_tokenizer_task, "train_tokenadapt": build_tokenadapt_task,
                "pretrain_mtm": build_mtm_task}
    return builders.get(cfg.task.name, build_classifier)(cfg, dm)


def build_classifier(cfg: DictConfig, dm, cls: type = ClassificationTask, **extra) -> ClassificationTask:
    """A ``cls`` (ClassificationTask or a subclass, given its ``extra`` arguments) for this data."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    tokens = cfg.data.kind == "tokens"
    if tokens != (model["input"] == "tokens"):
        raise ValueError(f"model.input={model['input']!r} does not fit data.kind={cfg.data.kind!r}")
    if model.get("pretrained") and not tokens:
        raise ValueError(f"model.pretrained={model['pretrained']} is an MTM encoder of token ids; it cannot start "
                         "a pixel model (data.kind=images)")
    fingerprint = None
    if tokens:
        info = dm.load_info()
        model["codebook_size"] = info.codebook_size
        model["codebook_dim"] = int(info.meta.get("embed_dim", 32))
        fingerprint = info.fingerprint
    task = cls(
        model=model, optim=OmegaConf.to_container(cfg.optim, resolve=True),
        aug=OmegaConf.to_container(cfg.aug, resolve=True), num_classes=dm.num_classes,
        input_grid=input_grid(dm), batch_size=int(cfg.data.batch_size), codebook_sha256=fingerprint,
        label_smoothing=cfg.task.label_smoothing, ema_decay=cfg.task.ema_decay, compile=cfg.task.compile,
        seed=int(cfg.seed), linear_probe=bool(cfg.task.get("linear_probe")), **extra)
    if tokens:
        task.load_codebook(info.load_codebook())
        if model.get("pretrained"):
            task.load_pretrained(model["pretrained"])
        if cfg.aug.tokenadapt.checkpoint:
            task.load_tokenadapt(cfg.aug.tokenadapt.checkpoint)
        if cfg.aug.eda.replace_prob > 0:  # Token-EDA: the dataset's table, else the same one from its codebook
            task.load_synonyms(info.load_synonyms() if info.meta.get("synonyms_file")
                               else synonyms(info.load_codebook(), int(cfg.data.build.get("synonyms_k") or 5)))
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
    if cfg.task.name == "train" and dm.num_classes < 2:
        raise ValueError(f"{cfg.data.get('root') or cfg.data.source} has {dm.num_classes} classes; "
                         "classification needs labelled images (class subfolders)")
    if cfg.task.name == "train" and cfg.data.kind == "tokens":
        dm.check_labelled(cfg.data.train_split, cfg.data.val_split)
    task = build_task(cfg, dm)
    throughput = TrainThroughput()
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[*instantiate_all(cfg.get("callbacks")), throughput],
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
    wall = time.perf_counter() - start
    samples_per_rank = gather(throughput.samples)

    metrics = {k: to_float(v) for k, v in trainer.callback_metrics.items()}
    ckpt = trainer.checkpoint_callback
    summary = {
        "task": cfg.task.name,
        "metrics": {k: v for k, v in sorted(metrics.items()) if v is not None},
        "wall_s": round(wall, 3),
        "train_s": round(throughput.seconds, 3),  # training epochs without their validation
        "world_size": trainer.world_size,
        "samples_seen": sum(samples_per_rank),
        "samples_seen_per_rank": samples_per_rank,
        "samples_per_s": round(sum(samples_per_rank) / throughput.seconds, 2) if throughput.seconds else None,
        "global_step": trainer.global_step,
        "config_hash": config_hash(cfg),
        "ckpt_path": (ckpt.best_model_path or ckpt.last_model_path) if ckpt else None,  # best by val/acc1
        "last_ckpt_path": ckpt.last_model_path if ckpt else None,
        "output_dir": str(output_dir),
    }
    summary.update({k: summary["metrics"][k] for k in REPORTED if k in summary["metrics"]})
    if hasattr(task, "export") and trainer.is_global_zero:
        summary.update(task.export(output_dir))
    if cfg.data.kind == "tokens":
        summary["dataset"] = {"root": str(dm.load_info().root), **storage_summary(dm.load_info().meta)}
    if trainer.is_global_zero:
        write_summary(output_dir, summary)
        report(summary)
    return summary


def report(summary: dict) -> None:
    parts = [f"{k}={summary[k]:.4f}" for k in REPORTED if k in summary]
    parts.append(f"wall {summary['wall_s']:.1f}s")
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
