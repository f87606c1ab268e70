"""The LightningModule every objective derives from: what training needs beyond the loss.

A task is built from config: ``conf/task/NAME.yaml`` names the class as ``_target_`` and hands it
the config groups it reads (``model: ${model}``, ``optim: ${optim}``, ...) as plain dicts, so
checkpoints keep plain hyper-parameters and load with ``weights_only=True``. The pipeline adds
``data``: what the data module knows and a config cannot (``DataFacts``). Here, once for all:

- ``data_kind``: the representation the objective learns from (``tokens``, ``images`` or None);
  a mismatch is refused at construction with the config that fits;
- ``step_generator``: the random draws of a step come from (seed, rank, global step) only, so a
  resumed run augments and masks every step as the uninterrupted run did; the global RNGs that
  dropout and drop-path draw from are seeded the same way for each training batch (and restored
  after it), so they repeat on resume too;
- a model EMA (timm ``ModelEmaV3``) updated once per optimizer step, not per accumulated micro-batch;
- ``torch.compile`` of ``compiled_modules()`` in place (parameter names, hence checkpoints, unchanged);
- the dataset's frozen codebook installed into ``codebook_embeddings()`` (``attach``) and checked
  against the dataset at fit start (a resumed checkpoint of another codebook is refused);
- the optimizer and the schedule from ``optim`` / ``scheduler`` (``_target_``: timm's
  ``create_optimizer_v2`` with layer decay, and a warmup-cosine ``LambdaLR``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import hydra
from hydra.errors import InstantiationException
import pytorch_lightning as pl
import torch
from timm.utils import ModelEmaV3

from seit.augment.pipeline import global_rngs_seeded, step_seed
from seit.data.dataset_info import DatasetError
from seit.utils.resume import finish_restart_at_epoch_end
from seit.utils.validate import DATA_HINT


@dataclass
class DataFacts:
    """What the data decides about a model: read once from the data module by the pipeline.

    ``input_grid``: ids per side (tokens) or pixels per side (images) of a training sample;
    ``codebook_*``: the dataset's codebook (tokens only); ``batch_size``: per device.
    """

    kind: str
    num_classes: int
    input_grid: int
    batch_size: int
    codebook_size: int = 0
    codebook_dim: int = 0
    codebook_sha256: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def build_model(model: dict, **sizes):
    """Instantiate a ``conf/model`` config (``_target_``), adding the sizes the data decides.

    ``name`` and ``pretrained`` describe the run, not the module, and are left out. The model's own
    ValueErrors (a bad setting, a part that cannot be imported) come out as they are, not wrapped
    in Hydra's "Error in call to target" text.
    """
    args = {k: v for k, v in model.items() if k not in ("name", "pretrained")}
    try:
        return hydra.utils.instantiate(args, **sizes, _convert_="all")
    except InstantiationException as e:
        if isinstance(e.__cause__, ValueError):
            raise e.__cause__ from None
        raise


class SeitTask(pl.LightningModule):
    data_kind: str | None = None  # the representation this objective learns from; None: either

    def __init__(self, *, data: dict, optim: dict, scheduler: dict | None = None, seed: int = 0,
                 ema_decay: float = 0.0, compile: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.data = DataFacts(**data)
        if self.data_kind is not None and self.data.kind != self.data_kind:
            raise ValueError(f"{type(self).__name__} learns from {self.data_kind}, not data.kind={self.data.kind!r}: "
                             f"use {DATA_HINT[self.data_kind]}")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"task.ema_decay={ema_decay} must be in [0, 1)")
        self.ema: ModelEmaV3 | None = None
        self._generator: torch.Generator | None = None
        self._attached = False
        self._compiled = False

    @classmethod
    def from_hparams(cls, hparams: dict) -> "SeitTask":
        """The module a checkpoint's ``hyper_parameters`` describe (weights not loaded); checkpoints
        written before tasks took ``data`` are upgraded by ``upgrade_hparams``."""
        if "data" not in hparams:
            hparams = cls.upgrade_hparams(dict(hparams))
        return cls(**hparams)

    @classmethod
    def upgrade_hparams(cls, hparams: dict) -> dict:
        raise ValueError(f"a {cls.__name__} checkpoint written before the config-composed tasks (its hyper-parameters "
                         "have no 'data'); this version cannot rebuild it: train it again")

    # -- what a subclass names ----------------------------------------------------------------
    def optimized_module(self) -> torch.nn.Module:
        """What the optimizer trains (its ``no_weight_decay()`` / ``group_matcher`` are honoured)."""
        return self.model

    def compiled_modules(self) -> list[torch.nn.Module]:
        """What ``compile=true`` compiles in place."""
        return []

    def codebook_embeddings(self) -> list:
        """The frozen ``CodebookEmbedding`` modules that must hold the dataset's codebook."""
        return []

    def attach_data(self, datamodule) -> None:
        """Install what the dataset holds beyond its samples (override to add, e.g., synonyms)."""
        if self.data.kind == "tokens" and datamodule is not None and hasattr(datamodule, "load_info"):
            self.load_codebook(datamodule.load_info().load_codebook())

    # -- data ---------------------------------------------------------------------------------
    def attach(self, datamodule) -> None:
        """``attach_data`` once: before fit (or at ``setup``), and never again over trained weights."""
        if not self._attached:
            self.attach_data(datamodule)
            self._attached = True

    def setup(self, stage: str | None = None) -> None:
        if self._trainer is not None:
            self.attach(self.trainer.datamodule)

    def step_generator(self, step: int | None = None) -> torch.Generator:
        """A generator seeded by (seed, rank, ``step``, default the global step): a step's draws only."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
        rank = self.global_rank if self._trainer is not None else 0
        self._generator.manual_seed(step_seed(self.hparams.seed, rank, self.global_step if step is None else step))
        return self._generator

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Seed the global RNGs (dropout, drop-path) from (seed, rank, step, batch) for this batch's
        forward and backward; ``on_train_batch_end`` gives their previous state back."""
        rank = self.global_rank if self._trainer is not None else 0
        seed = step_seed(self.hparams.seed, rank, self.global_step) * 1_000_003 + batch_idx  # micro-batches apart
        self._seeded_rngs = global_rngs_seeded(seed % 2**63, self.device)
        self._seeded_rngs.__enter__()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if getattr(self, "_seeded_rngs", None) is not None:
            self._seeded_rngs.__exit__(None, None, None)
            self._seeded_rngs = None

    def on_train_start(self) -> None:
        """After a resume: the first epoch must count and start as it would have uninterrupted, and a
        resumed partial epoch draws its batches from its own epoch's order, not epoch 0's."""
        finish_restart_at_epoch_end(self.trainer)
        self.set_data_epoch()

    def on_train_epoch_start(self) -> None:
        self.set_data_epoch()

    def set_data_epoch(self) -> None:
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "set_epoch"):
            dm.set_epoch(self.current_epoch)

    # -- codebook -----------------------------------------------------------------------------
    def load_codebook(self, codebook: torch.Tensor) -> None:
        for embedding in self.codebook_embeddings():
            embedding.load_codebook(codebook)

    def check_codebook(self, expected: str, where: str) -> None:
        """Raise if the model's codebook is not the one the dataset was tokenized with."""
        for embedding in self.codebook_embeddings():
            own = embedding.fingerprint
            if own != expected:
                raise DatasetError(f"codebook mismatch: {where} was tokenized with codebook {expected[:12]}…, but the "
                                   f"model (or checkpoint) holds codebook {own[:12]}…; re-tokenize or pick a "
                                   "matching checkpoint")

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if self.codebook_embeddings() and dm is not None and hasattr(dm, "load_info"):
            info = dm.load_info()
            self.check_codebook(info.fingerprint, f"the dataset {info.root}")

    # -- EMA and compile ----------------------------------------------------------------------
    def enable_ema(self, module: torch.nn.Module) -> None:
        """Keep an EMA copy of ``module`` (when ``ema_decay`` > 0), updated after each optimizer step."""
        self._ema_source = module
        self.ema = ModelEmaV3(module, decay=self.hparams.ema_decay) if self.hparams.ema_decay > 0 else None

    def optimizer_step(self, *args, **kwargs) -> None:
        """One optimizer step, then one EMA update: with gradient accumulation the EMA decays per
        step as configured, not once per micro-batch."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:  # step: optimizer steps done, this one included (global_step counts it later)
            self.ema.update(self._ema_source, step=self.global_step + 1)

    def configure_model(self) -> None:
        if self.hparams.compile and not self._compiled:
            for module in self.compiled_modules():
                module.compile()
            self._compiled = True

    # -- optimisation -------------------------------------------------------------------------
    def global_batch(self) -> int:
        """Samples per optimizer step over all ranks and accumulated batches."""
        if self._trainer is None:
            return self.data.batch_size
        return self.data.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def create_optimizer(self, params=None) -> torch.optim.Optimizer:
        """``optim``'s optimizer over ``params`` (default: ``optimized_module()``)."""
        factory = hydra.utils.instantiate(self.hparams.optim, _convert_="all")  # a _partial_: the params come now
        return factory(params if params is not None else self.optimized_module(), global_batch=self.global_batch())

    def create_scheduler(self, optimizer: torch.optim.Optimizer) -> dict:
        """``scheduler``'s Lightning entry for ``optimizer`` (a ``_partial_`` given the optimizer and trainer)."""
        return hydra.utils.instantiate(self.hparams.scheduler, _convert_="all")(optimizer, self.trainer)

    def configure_optimizers(self):
        optimizer = self.create_optimizer()
        if not self.hparams.scheduler:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.create_scheduler(optimizer)}
