"""``task=continual``: class-incremental learning with a replay memory budgeted in bytes.

For each task: train on its classes plus the memory, evaluate on every class seen so far, rebuild
the memory, then write ``tasks/NN/`` (the model, the memory's files, ``result.json`` last). A
relaunch with the same run dir skips the finished tasks, reloads the model and the memory of the
last one, and resumes an interrupted task from its ``checkpoints/last.ckpt``. Tokens and pixels
take the same path; only the sample store differs (token chunks or JPEG files).

Names: a *task* is one class-incremental step (``tasks[t]``, ``tasks/NN/``), as the field says, and
``cfg.task`` is this pipeline's config; the LightningModule that learns them all is the *learner*.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger

from seit.continual.memory import JpegSamples, ReplayMemory, TokenSamples, parse_bytes
from seit.continual.protocol import AccuracyMatrix, class_order, matrix_png, split_tasks
from seit.pipelines.run_visuals import RunVisuals
from seit.pipelines.train import build_datamodule, data_facts, instantiate_all, instantiate_task, resolve_ckpt_path
from seit.tasks.continual import ContinualTask
from seit.utils.io import atomic_open, atomic_write_json
from seit.utils.summary import config_hash, write_summary

log = logging.getLogger(__name__)
PIPELINE_KEYS = ("num_tasks", "order_seed", "class_order", "memory")  # task.* read here, not by the module


def sample_store(cfg: DictConfig, dm):
    """The training split as exemplars: token grids through the dataset's codec, or image files."""
    split = cfg.data.train_split
    if cfg.data.kind == "tokens":
        ids, labels, _ = dm.split_arrays(split)
        info = dm.load_info()
        return TokenSamples(ids, labels, info.load_codec(), info.codebook_size)
    return JpegSamples(dm.records(split), int(cfg.data.image_size), cfg.task.memory.get("jpeg_quality"))


def trainable(cfg: DictConfig, dm, n: int) -> np.ndarray:
    """Which train samples the loader serves: all, or those of the ``data.subset`` manifest."""
    masks = dm.subset_masks(cfg.data.train_split) if cfg.data.kind == "tokens" else None
    if masks is None:
        return np.ones(n, bool)
    return np.concatenate([masks[p] for p in dm.load_info().shard_paths(cfg.data.train_split)])


def predict_split(learner: ContinualTask, store, idx: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) of the samples ``idx``, decoded a chunk at a time (pixels at scale do not fit at once)."""
    parts = [learner.predict(store.inputs(idx[i:i + chunk])) for i in range(0, len(idx), chunk)]
    if not parts:
        return np.zeros((0, 0), np.float32), np.zeros((0, learner.seen), np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def task_trainer(cfg: DictConfig, task_dir: Path, loggers: list) -> pl.Trainer:
    """The configured trainer for one task: no validation inside fit (the pipeline evaluates after
    it), and a last.ckpt in the task's dir for resuming an interrupted task."""
    callbacks = [c for c in instantiate_all(cfg.get("callbacks")) if not isinstance(c, (ModelCheckpoint, RunVisuals))]
    for every in ({"every_n_epochs": 1}, {"every_n_train_steps": 100}):  # both write last.ckpt; the newer wins
        callbacks.append(ModelCheckpoint(dirpath=task_dir / "checkpoints", save_top_k=0, save_last=True,
                                         enable_version_counter=False, **every))
    epochs = int(cfg.trainer.max_epochs)
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, max_time=None,
                                   check_val_every_n_epoch=epochs + 1, num_sanity_val_steps=0)  # budget: per task


def finished_tasks(root: Path, num_tasks: int) -> list[dict]:
    """Results of the tasks already done, in order (a task counts once its result.json exists)."""
    done = []
    for t in range(num_tasks):
        path = root / f"{t:02d}" / "result.json"
        if not path.is_file():
            break
        done.append(json.loads(path.read_text()))
    return done


def continual(cfg: DictConfig) -> dict:
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    tasks_dir = output_dir / "tasks"
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    if cfg.data.kind == "tokens":  # its labels are read next in any case
        dm.check_labelled(cfg.data.train_split, cfg.data.val_split, read=True)
    order = class_order(dm.num_classes, int(cfg.task.order_seed), cfg.task.get("class_order"))
    tasks = split_tasks(order, int(cfg.task.num_tasks))
    store = sample_store(cfg, dm)
    allowed = trainable(cfg, dm, len(store.labels))
    learner = instantiate_task(cfg.task, data_facts(cfg, dm), skip=PIPELINE_KEYS, class_order=order)
    learner.attach(dm)
    memory = ReplayMemory(store, parse_bytes(cfg.task.memory.budget), str(cfg.task.memory.selection),
                          seed=int(cfg.seed), keep_logits=cfg.task.method == "derpp")
    matrix = AccuracyMatrix(tasks)
    loggers = instantiate_all(cfg.get("logger"))
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    protocol = {"tasks": tasks, "method": str(cfg.task.method), "selection": memory.selection,
                "budget_bytes": memory.budget, "input": cfg.data.kind}
    results = finished_tasks(tasks_dir, len(tasks))
    for r in results:
        if r["protocol"] != protocol:
            raise ValueError(f"{tasks_dir} holds tasks of another protocol ({r['protocol']}); this run is {protocol}. "
                             "Resume with the same settings, or pick a new run dir (run_name=...)")
        matrix.record(r["task"], {int(k): v for k, v in r["eval_correct"].items()},
                      {int(k): v for k, v in r["eval_total"].items()})
    if results:
        last = tasks_dir / f"{len(results) - 1:02d}"
        learner.model.load_state_dict(torch.load(last / "model.pt", map_location="cpu", weights_only=True))
        memory.load(last / "memory")
        log.info("resuming after task %d of %d from %s", len(results) - 1, len(tasks), last)

    start = time.perf_counter()
    for t in range(len(results), len(tasks)):
        task_dir = tasks_dir / f"{t:02d}"
        seen = [c for group in tasks[:t + 1] for c in group]
        log.info("task %d/%d: classes %s; memory %d exemplars, %d bytes", t + 1, len(tasks), tasks[t],
                 len(memory), memory.nbytes)
        pl.seed_everything(int(cfg.seed) * 1000 + t, workers=True)  # a resumed task repeats the uninterrupted one
        learner.begin_task(seen=len(seen), old=len(seen) - len(tasks[t]), replay=memory.replay_set())
        trainer = task_trainer(cfg, task_dir, loggers)
        t0 = time.perf_counter()
        dm.restrict_classes(tasks[t])
        trainer.fit(learner, datamodule=dm, ckpt_path=resolve_ckpt_path("last", task_dir))
        train_s = time.perf_counter() - t0
        dm.restrict_classes(seen)
        trainer.validate(learner, datamodule=dm, verbose=False)
        correct, total = learner.eval_correct.cpu().numpy(), learner.eval_total.cpu().numpy()
        train_counts = learner.train_counts.cpu().numpy()
        matrix.record(t, {c: int(correct[c]) for c in seen}, {c: int(total[c]) for c in seen})
        leaked = sorted(set(np.flatnonzero(total).tolist()) - set(seen))
        if leaked:
            raise AssertionError(f"task {t} evaluated classes {leaked} that it has not seen")

        new_idx = np.flatnonzero(np.isin(store.labels, tasks[t]) & allowed)
        mem_stats = {}
        if trainer.is_global_zero:
            features, logits = predict_split(learner, store, new_idx)
            row = {int(i): r for r, i in enumerate(new_idx)}
            mem_stats = memory.update(t, new_idx, logit_dim=len(seen),
                                      features=lambda idx: features[[row[int(i)] for i in idx]],
                                      logits=lambda idx: logits[[row[int(i)] for i in idx]])
            result = {"task": t, "protocol": protocol, "classes": tasks[t], "seen_classes": seen,
                      "train_classes": np.flatnonzero(train_counts).tolist(),
                      "train_samples": {int(c): int(n) for c, n in enumerate(train_counts) if n},
                      "eval_classes": np.flatnonzero(total).tolist(),
                      "eval_correct": {c: int(correct[c]) for c in seen}, "eval_total": {c: int(total[c]) for c in seen},
                      "seen_accuracy": matrix.seen_accuracy(t), "accuracy_row": matrix.acc[t, :t + 1].tolist(),
                      "memory": mem_stats, "train_s": round(train_s, 2)}
            with atomic_open(task_dir / "model.pt") as f:
                torch.save(learner.model.state_dict(), f)
            memory.save(task_dir / "memory")
            atomic_write_json(task_dir / "result.json", result)  # last: the task is done
            shutil.rmtree(task_dir / "checkpoints", ignore_errors=True)
            results.append(result)
            log.info("task %d: accuracy on the %d seen classes %.4f; memory %d exemplars in %d of %d bytes",
                     t + 1, len(seen), result["seen_accuracy"], mem_stats["exemplars"], mem_stats["bytes"], memory.budget)
        _log_task(loggers, t, matrix, mem_stats)
        if trainer.world_size > 1:  # every rank replays the memory rank 0 wrote
            trainer.strategy.barrier()
            memory.load(task_dir / "memory")

    scores = matrix.summary()
    summary = {
        "task": "continual", "method": cfg.task.method, "representation": cfg.data.kind,
        "selection": memory.selection, "budget_bytes": memory.budget, "num_tasks": len(tasks),
        "class_order": order, "tasks": tasks, **scores,
        "metrics": {"continual/average_incremental_accuracy": scores.get("average_incremental_accuracy"),
                    "continual/final_accuracy": scores.get("final_accuracy"),
                    "continual/forgetting": scores.get("forgetting")},
        "memory": [r["memory"] for r in results],
        "per_task": [{k: r[k] for k in ("task", "classes", "train_classes", "eval_classes", "seen_accuracy",
                                        "train_s")} for r in results],
        "wall_s": round(time.perf_counter() - start, 2),
        "config_hash": config_hash(cfg), "output_dir": str(output_dir),
    }
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        png = output_dir / "accuracy_matrix.png"
        matrix_png(matrix.acc, png, f"{cfg.data.kind}, {cfg.task.method}/{memory.selection}, "
                                    f"{memory.budget:,} B: avg inc. {scores.get('average_incremental_accuracy', 0):.3f}")
        for lg in loggers:
            if isinstance(lg, WandbLogger):
                lg.log_image(key="continual/accuracy_matrix", images=[str(png)])
        for lg in loggers:
            lg.log_metrics({k: v for k, v in summary["metrics"].items() if v is not None}, step=len(tasks) - 1)
        summary.update(learner.export(output_dir))  # the final model, head in label order
        write_summary(output_dir, summary)
        print(f"final: average incremental accuracy {scores.get('average_incremental_accuracy', float('nan')):.4f}, "
              f"final accuracy {scores.get('final_accuracy', float('nan')):.4f}, forgetting "
              f"{scores.get('forgetting', float('nan')):.4f}; memory {len(memory)} exemplars in "
              f"{memory.nbytes:,} of {memory.budget:,} bytes", flush=True)
        print(f"summary: {output_dir / 'summary.json'}", flush=True)
    for lg in loggers:
        lg.finalize("success")
    return summary


def _log_task(loggers: list, t: int, matrix: AccuracyMatrix, mem: dict) -> None:
    row = matrix.acc[t]
    metrics = {"continual/seen_accuracy": matrix.seen_accuracy(t), "continual/task": t,
               **{f"continual/acc_task{j}": float(row[j]) for j in range(t + 1)}}
    if mem:
        metrics.update({"continual/memory_exemplars": mem["exemplars"], "continual/memory_bytes": mem["bytes"]})
    for lg in loggers:
        lg.log_metrics(metrics, step=t)
