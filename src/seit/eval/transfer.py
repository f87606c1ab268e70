"""``eval=transfer``: fine-tune the checkpoint's body on another labelled dataset, and (``baseline``)
train the same architecture from random initialisation with the same budget, so the gain of the
pre-training shows: ``acc1`` / ``acc5`` after fine-tuning, ``scratch_acc1`` / ``scratch_acc5``,
and ``gain_acc1`` (their difference), all on the target's val split.

Both are ordinary training runs through the one training path (``ctx.train``: the pipelines'
``train(cfg)``), on a config derived from the eval run's:

- ``task``: ``conf/task/train.yaml`` (classification), resolved in the derived run's context;
- ``model``: the checkpoint's own model config (export metadata or ``.ckpt`` hyper-parameters;
  the eval run's ``model`` for an ``mtm.safetensors``), with ``model.pretrained=<checkpoint>``:
  ``ClassificationTask.load_pretrained`` copies everything but the head and refuses another
  architecture or codebook;
- ``data``: the target. A token model takes a token dataset (``data.root``) or an image folder
  (``data.build.source``) that is tokenized with the checkpoint's tokenizer (the one the eval
  data records, or ``task.tokenizer``) into ``<run>/transfer/tokens`` unless ``data.root`` says
  where; a pixel model takes an image folder (``data.source``). The number of classes is the
  target's. E.g. pre-train on 10 Tiny-ImageNet-20 classes, transfer to a folder of the other 10;
- ``trainer.max_epochs=epochs`` (null: the run's), ``optim.lr=lr`` (null: the run's optimizer),
  everything else (aug, optim, trainer, debug settings) as in the eval run.

The runs live in ``<run>/transfer/pretrained`` and ``<run>/transfer/scratch`` (summary.json,
checkpoints, classifier.safetensors); a finished one is not trained again.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from seit.data.dataset_info import DatasetError
from seit.eval.context import EvalContext
from seit.eval.result import EvalResult, Table
from seit.utils.validate import ConfigError

log = logging.getLogger(__name__)
TRAIN_TASK = Path(__file__).resolve().parents[3] / "conf" / "task" / "train.yaml"


def model_config(path: Path, fallback: DictConfig) -> dict:
    """The ``conf/model`` config a checkpoint of ours was trained with (``fallback``: an MTM export,
    which holds the encoder's config only, starts the run's ``model``)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("kind") == "classifier":
            return dict(json.loads(meta["config"])["model"])
        return OmegaConf.to_container(fallback, resolve=True)
    hp = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["hyper_parameters"]
    if "data" not in hp:  # written before the config-composed tasks
        from seit.tasks.classification import ClassificationTask

        hp = ClassificationTask.upgrade_hparams(dict(hp))
    return {k: v for k, v in dict(hp["model"]).items() if k != "pretrained"}


def _without_nulls(node: dict) -> dict:
    """A config dict without its null leaves (and the dicts they leave empty): the keys not overridden."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            value = _without_nulls(value)
        if value is not None and value != {}:
            out[key] = value
    return out


class Transfer:
    """``data``: overrides of the run's ``data`` naming the target (``root``, ``build.source`` or
    ``source``, and any other data key); ``epochs``, ``lr``: the fine-tuning budget (null: the
    run's); ``baseline``: also train from scratch; ``task_config``: the training task's config file
    (default ``conf/task/train.yaml``)."""

    name = "transfer"

    def __init__(self, data: dict | None = None, epochs: int | None = None, lr: float | None = None,
                 baseline: bool = True, task_config: str | None = None):
        self.data = _without_nulls(dict(data or {}))
        self.epochs, self.lr, self.baseline = epochs, lr, bool(baseline)
        self.task_config = Path(task_config) if task_config else TRAIN_TASK
        if epochs is not None and int(epochs) < 1:
            raise ConfigError(f"eval.transfer.epochs={epochs}: must be >= 1 (or null: the run's trainer.max_epochs)")
        if lr is not None and not float(lr) > 0:
            raise ConfigError(f"eval.transfer.lr={lr}: must be > 0 (or null: the run's optimizer settings)")

    def __call__(self, ctx: EvalContext) -> EvalResult | None:
        if ctx.train is None:
            raise RuntimeError("eval=transfer trains, and this EvalContext was given no training path (ctx.train)")
        model = ctx.model
        if model.kind == "mtm" and model.path.suffix != ".safetensors":
            raise ConfigError(f"eval=transfer starts from {model.path}, a task=pretrain_mtm checkpoint: pass its "
                              "export <run>/mtm.safetensors as task.checkpoint")
        out = ctx.output_dir / self.name
        base = self.derived(ctx, out)
        inits = {"pretrained": str(model.path)} | ({"scratch": None} if self.baseline else {})
        summaries = {}
        for init, pretrained in inits.items():
            cfg = copy.deepcopy(base)
            with open_dict(cfg):
                cfg.model.pretrained = pretrained
                cfg.paths.output_dir = str(out / init)
            log.info("eval=transfer: training from %s in %s", pretrained or "random init", out / init)
            summaries[init] = ctx.train(cfg)
        if ctx.rank != 0:
            return None
        return self.result(summaries, base, out)

    # -- the derived training run ---------------------------------------------------------------
    def derived(self, ctx: EvalContext, out: Path) -> DictConfig:
        """The eval run's config with the training task, the checkpoint's model and the target data."""
        if not self.task_config.is_file():
            raise FileNotFoundError(f"eval.transfer.task_config: {self.task_config} not found (the training task's "
                                    "config, conf/task/train.yaml)")
        cfg = copy.deepcopy(ctx.cfg)
        OmegaConf.set_struct(cfg, False)
        cfg.pop("eval", None)
        cfg.task = OmegaConf.load(self.task_config)
        cfg.model = OmegaConf.create(model_config(ctx.model.path, ctx.cfg.model))
        cfg.data = self.target_data(ctx, out)
        if ctx.model.input == "tokens":
            cfg.tokenizer = self.tokenizer_config(ctx, cfg.data)
        cfg.ckpt_path = "last"  # an interrupted eval resumes its fine-tuning
        if self.epochs is not None:
            cfg.trainer.max_epochs = int(self.epochs)
        if self.lr is not None:
            cfg.optim.lr = float(self.lr)
        return cfg

    def target_data(self, ctx: EvalContext, out: Path) -> DictConfig:
        """The run's ``data`` with the target's keys: nothing of the eval data's source or subset is kept."""
        target = OmegaConf.create(self.data)
        tokens = ctx.model.input == "tokens"
        source = OmegaConf.select(target, "build.source") or target.get("source")
        if not (target.get("root") or source):
            raise ConfigError("eval=transfer needs a target: eval.transfer.data.root=<token dataset> or "
                              "eval.transfer.data.build.source=<image folder with train/ and val/ class folders>")
        data = copy.deepcopy(ctx.cfg.data)
        OmegaConf.set_struct(data, False)
        if tokens:
            target.pop("source", None)
            if source:
                OmegaConf.update(target, "build.source", str(source), force_add=True)
            data.build.source = None
            data.subset = None
            data = OmegaConf.merge(data, target)
            if not target.get("root"):
                data.root = str(out / "tokens")
        else:
            target.pop("build", None)
            data = OmegaConf.merge(data, target)
            data.source = str(source) if source else data.source
        return data

    def tokenizer_config(self, ctx: EvalContext, data: DictConfig) -> DictConfig:
        """The run's tokenizer settings, pointed at the checkpoint's tokenizer file (the eval data's):
        a target folder is tokenized with it, and a target dataset must have been built with it."""
        tokenizer = ctx.tokenizer()  # the eval dataset's, its codebook checked against the model's
        info = ctx.info()
        path = str(ctx.cfg.task.get("tokenizer") or (info.meta.get("tokenizer") or {}).get("checkpoint"))
        cfg = copy.deepcopy(ctx.cfg.tokenizer)
        OmegaConf.set_struct(cfg, False)
        if tokenizer.kind == "taming_vqgan":  # tokenize converts a taming checkpoint beside the data root:
            beside = Path(data.root).parent / f"{Path(data.root).name}.tokenizer.safetensors"
            if not beside.is_file():  # put the converted one there, so it is read as it is
                beside.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, beside)
            path = str(beside)
        cfg.kind, cfg.checkpoint, cfg.image_size = tokenizer.kind, path, int(tokenizer.image_size)
        for key, value in (("patch_size", tokenizer.downsample), ("codebook_size", tokenizer.codebook_size)):
            if key in cfg:  # the file's, which the build checks compare against (synonyms_k < codebook_size)
                cfg[key] = int(value)
        return cfg

    # -- the report -----------------------------------------------------------------------------
    def result(self, summaries: dict, cfg: DictConfig, out: Path) -> EvalResult:
        def acc(summary: dict, k: int) -> float:
            value = summary.get(f"val/acc{k}", summary.get("metrics", {}).get(f"val/acc{k}"))
            if value is None:
                raise DatasetError(f"eval=transfer: the run in {summary.get('output_dir')} reported no val/acc{k} "
                                   "(no validation ran: check the target's val split)")
            return float(value)

        pre = summaries["pretrained"]
        metrics = {"acc1": acc(pre, 1), "acc5": acc(pre, 5)}
        if "scratch" in summaries:
            metrics |= {"scratch_acc1": acc(summaries["scratch"], 1), "scratch_acc5": acc(summaries["scratch"], 5)}
            metrics["gain_acc1"] = metrics["acc1"] - metrics["scratch_acc1"]
        rows = [[init, acc(s, 1), acc(s, 5), int(s.get("global_step", 0)), float(s.get("wall_s", 0.0)),
                 s.get("output_dir", "")] for init, s in summaries.items()]
        target = cfg.data.root if cfg.data.kind == "tokens" else cfg.data.source
        table = Table(f"transfer to {target} (val split {cfg.data.val_split})",
                      ["init", "acc1", "acc5", "steps", "wall_s", "run"], rows)
        details = {"target": str(target), "epochs": int(cfg.trainer.max_epochs), "lr": self.lr,
                   "model": OmegaConf.to_container(cfg.model, resolve=True),
                   "runs": {init: {"output_dir": s.get("output_dir"), "classifier_export": s.get("classifier_export"),
                                   "global_step": s.get("global_step")} for init, s in summaries.items()},
                   "output_dir": str(out)}
        return EvalResult(metrics, [table], details)
