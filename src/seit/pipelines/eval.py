"""``task=eval``: score any trained model of ours with the evaluators ``eval=[...]`` selects.

    python run.py task=eval experiment=tiny20_tokens task.checkpoint=RUN/classifier.safetensors eval=[classify,knn]

The checkpoint is read by ``seit.tasks.checkpoint.load_model`` (a classifier, continual or MTM
``.ckpt``, or an export), the data is the run config's ``data`` (a token model scores a token
dataset, a pixel model an image folder). Each evaluator (``conf/eval/<name>.yaml``: ``_target_``
and its settings) is called in turn on every rank; rank 0 writes:

- ``summary.json``: the metrics (``eval/<evaluator>/<metric>``) and each evaluator's details;
- ``eval.md``: one Markdown section per evaluator with its tables;
- the metrics to the configured loggers (csv, wandb).

Frozen features are computed once per split and shared by knn, linear and fewshot
(``features/<split>.npz`` in the run dir). A finished run dir is not evaluated again.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from seit.eval.context import EvalContext
from seit.eval.result import EvalResult
from seit.tasks.checkpoint import load_model
from seit.utils.io import atomic_write_bytes
from seit.utils.ranks import rank_world
from seit.utils.summary import config_hash, write_summary
from seit.utils.validate import ConfigError, locate

log = logging.getLogger(__name__)


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def selected_evaluators(cfg: DictConfig) -> dict:
    node = cfg.get("eval")
    chosen = {k: v for k, v in (node or {}).items() if v is not None}
    if not chosen:
        raise ConfigError("task=eval needs evaluators: eval=[classify,knn,linear,fewshot,transfer,robustness,"
                          "segmentation,pixels] (any of them; see conf/eval/)")
    for name, sub in chosen.items():
        if "_target_" not in sub:
            raise ConfigError(f"eval.{name} names no evaluator class (_target_)")
    return chosen


def finished_evaluation(output_dir: Path, cfg: DictConfig) -> dict | None:
    """The summary of this same evaluation when the run dir holds it (a repeated command: nothing
    is computed again); another evaluation's dir is refused, so no result is silently missing."""
    import json

    path = output_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if summary.get("task") == "eval" and summary.get("config_hash") == config_hash(cfg):
        print(f"already evaluated: {path} (evaluators {', '.join(summary.get('evaluators', []))}); a new run_name "
              "(or hydra.run.dir) evaluates again", flush=True)
        return summary
    raise ConfigError(f"{output_dir} already holds the results of another run ({summary.get('task')}, evaluators "
                      f"{summary.get('evaluators', '-')}): evaluate into a new run_name or hydra.run.dir")


def build_evaluator(name: str, node: DictConfig):
    """The evaluator ``eval.<name>`` configures; its own ValueErrors (a bad setting) come out as
    they are, not inside Hydra's "Error in call to target" text."""
    from hydra.errors import InstantiationException

    locate(node._target_, f"eval.{name}._target_")
    try:
        return hydra.utils.instantiate(node, _convert_="all")
    except InstantiationException as e:
        if isinstance(e.__cause__, (ValueError, TypeError)):
            message = str(e.__cause__)
            raise ConfigError(message if message.startswith(f"eval.{name}") else f"eval.{name}: {message}") from None
        raise


def check_inputs(cfg: DictConfig, model) -> None:
    """A token model scores token data, a pixel model image data (the image-reading evaluators take
    a token model's images from its dataset's source)."""
    kind = str(cfg.data.kind)
    if model.input == "tokens" and kind != "tokens":
        raise ConfigError(f"{model.path} is a token model; it scores a token dataset (data.kind=tokens, e.g. "
                          f"experiment=tiny20_tokens), not data.kind={kind!r} (eval=pixels scores it on image files)")
    if model.input == "pixels" and kind != "images":
        raise ConfigError(f"{model.path} is a pixel model; it scores images (data.kind=images, e.g. "
                          f"experiment=tiny20_pixels), not data.kind={kind!r}")


def evaluate(cfg: DictConfig) -> dict:
    output_dir = Path(cfg.paths.output_dir)
    if (done := finished_evaluation(output_dir, cfg)) is not None:
        return done
    evaluators = {name: build_evaluator(name, node) for name, node in selected_evaluators(cfg).items()}  # settings first
    rank, world = rank_world()
    device = device_of(str(cfg.task.device))
    model = load_model(cfg.task.checkpoint).to(device)
    check_inputs(cfg, model)
    headless = [name for name, e in evaluators.items() if getattr(e, "needs_head", False) and model.num_classes == 0]
    if headless:
        raise ConfigError(f"eval={headless[0]} scores class predictions, but {model.path} is a {model.kind} model "
                          "without a classifier head; it takes eval=[knn,linear,fewshot,segmentation,transfer]")
    if cfg.data.kind == "tokens" and not (Path(cfg.data.root) / "dataset.json").is_file():
        from seit.pipelines.tokenize import prepare_token_dataset

        prepare_token_dataset(cfg)  # build a missing dataset; an existing one is scored whatever built it
    from seit.pipelines.train import train

    ctx = EvalContext(cfg=cfg, model=model, device=device, output_dir=output_dir, rank=rank, world=world, train=train)
    start = time.perf_counter()
    results: dict[str, EvalResult] = {}
    for name, evaluator in evaluators.items():
        log.info("eval=%s on %s", name, model.path)
        t0 = time.perf_counter()
        result = evaluator(ctx)
        if result is not None:
            result.details["wall_s"] = round(time.perf_counter() - t0, 2)
            results[name] = result
    if rank != 0:
        return {}
    metrics = {f"eval/{name}/{k}": float(v) for name, r in results.items() for k, v in r.metrics.items()}
    summary = {"task": "eval", "checkpoint": str(model.path), "model": {"kind": model.kind, "input": model.input,
               "num_classes": model.num_classes, "dim": model.dim, "codebook_sha256": model.fingerprint},
               "data": ctx.data_name(), "evaluators": list(results), "metrics": metrics,
               "details": {name: r.details for name, r in results.items()},
               "wall_s": round(time.perf_counter() - start, 2), "world_size": world,
               "config_hash": config_hash(cfg), "output_dir": str(output_dir)}
    write_report(output_dir / "eval.md", model, ctx.data_name(), results)
    log_metrics(cfg, metrics)
    write_summary(output_dir, summary)
    for key, value in metrics.items():
        print(f"{key} = {int(value) if float(value).is_integer() else f'{value:.4f}'}", flush=True)
    print(f"report: {output_dir / 'eval.md'}", flush=True)
    print(f"summary: {output_dir / 'summary.json'}", flush=True)
    return summary


def write_report(path: Path, model, data: str, results: dict[str, EvalResult]) -> None:
    parts = [f"# Evaluation of {model.path}", "", f"{model.kind} ({model.input}), data {data}", ""]
    for name, result in results.items():
        parts += [f"## {name}", "", "| metric | value |", "|---|---:|"]
        parts += [f"| {k} | {v:.4f} |" for k, v in result.metrics.items()]
        parts.append("")
        parts += [table.markdown() for table in result.tables]
    atomic_write_bytes(path, "\n".join(parts).encode())


def log_metrics(cfg: DictConfig, metrics: dict) -> None:
    from seit.pipelines.train import instantiate_all

    for lg in instantiate_all(cfg.get("logger")):
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        lg.log_metrics(metrics, step=0)
        lg.finalize("success")
