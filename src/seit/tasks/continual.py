"""Class-incremental training with replay: the classifier, plus what a task adds to its loss.

Labels become slots (their position in the class order), so the classes seen so far are the first
``seen`` logits and later tasks' logits are cut off, in training and in evaluation. Each step
trains on a batch of the current task's classes and, when the memory holds anything, on a batch
drawn from it (decoded from the memory's bytes, kept on the device):

- ``er``: cross-entropy on both;
- ``distill`` (iCaRL / LwF): plus the KL divergence between the old classes' tempered softmax of
  the model and of the frozen model from the end of the previous task, on both batches;
- ``derpp`` (DER++): the memory batch's cross-entropy weighted by ``beta`` and a mean squared
  error, weighted by ``alpha``, between its logits and those stored when its class was learned.
  Both terms use one memory batch (DER++ draws two), which halves the replay compute, and the
  logits are those of the model at the end of the class's task (DER++ records them while the
  task streams), because the memory is rebuilt between tasks.

The memory batch is augmented like the task's batch but never mixed (CutMix would blend a
stored sample's logits with another's).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from seit.augment.pipeline import eval_view
from seit.tasks.classification import ClassificationTask

METHODS = ("er", "distill", "derpp")


class ContinualTask(ClassificationTask):
    def __init__(self, *, class_order: list[int], method: str = "er", replay_batch: int = 64,
                 distill: dict | None = None, derpp: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        if method not in METHODS:
            raise ValueError(f"task.method must be one of {METHODS}, got {method!r}")
        slots = torch.empty(len(class_order), dtype=torch.long)
        slots[torch.tensor(class_order)] = torch.arange(len(class_order))
        self.register_buffer("slot_of", slots, persistent=False)
        self.replay_aug = dataclasses.replace(self.aug, mix={**self.aug.mix, "cutmix_alpha": 0.0, "mixup_alpha": 0.0})
        self.seen, self.old = len(class_order), 0  # slots in use now, and before this task
        self.teacher = None
        # Plain tensors, not buffers: DDP would broadcast buffers from rank 0 at every step,
        # overwriting each rank's counts (and shipping the whole memory).
        self.replay: dict[str, torch.Tensor] = {}
        n = len(class_order)
        self.counts = {k: torch.zeros(n, dtype=torch.long) for k in ("train", "eval_correct", "eval_total")}

    # -- what the pipeline sets before each task ----------------------------------------------
    def begin_task(self, seen: int, old: int, replay: dict | None) -> None:
        """Slots in use, the memory to replay, and (distill) a frozen copy of the model so far."""
        self.seen, self.old = seen, old
        if self.hparams.method == "distill" and old > 0:
            self.teacher = copy.deepcopy(self.model).requires_grad_(False).eval()
        else:
            self.teacher = None
        self.replay = dict(replay or {})
        self.counts["train"].zero_()

    def on_device(self, store: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors of ``store`` on the module's device (moved once, in place)."""
        for k, v in store.items():
            if v.device != self.device:
                store[k] = v.to(self.device)
        return store

    @property
    def train_counts(self) -> torch.Tensor:
        """Samples trained on per class in this task (new and replayed)."""
        return self.counts["train"]

    @property
    def eval_correct(self) -> torch.Tensor:
        return self.counts["eval_correct"]

    @property
    def eval_total(self) -> torch.Tensor:
        return self.counts["eval_total"]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # -- training -----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        h, g = self.hparams, self.step_generator()
        labels = batch["label"]
        counts, replay = self.on_device(self.counts), self.on_device(self.replay)
        counts["train"] += torch.bincount(labels, minlength=len(counts["train"]))
        x, targets = self.train_batch({**batch, "label": self.slot_of[labels]}, self.seen, generator=g)
        size = x.shape[0]
        memory = None
        if replay and len(replay["inputs"]):
            pick = torch.randint(len(replay["inputs"]), (h.replay_batch,), generator=g, device=g.device)
            mem_labels = replay["labels"][pick]
            counts["train"] += torch.bincount(mem_labels, minlength=len(counts["train"]))
            xm, tm = self.train_batch({self.input_key: replay["inputs"][pick], "label": self.slot_of[mem_labels]},
                                      self.seen, aug=self.replay_aug, generator=g)
            x, memory = torch.cat([x, xm]), (pick, tm)
        logits = self.model(x)[:, :self.seen]
        loss = new_loss = self.soft_criterion(logits[:size], targets)
        if memory is not None:
            pick, tm = memory
            replay_ce = self.soft_criterion(logits[size:], tm)
            if h.method == "derpp":
                stored, dims = replay["logits"][pick], replay["logit_dims"][pick]
                width = stored.shape[1]
                valid = torch.arange(width, device=dims.device)[None] < dims[:, None]
                mse = ((logits[size:, :width] - stored) ** 2 * valid).sum() / valid.sum().clamp(min=1)
                loss = loss + h.derpp["beta"] * replay_ce + h.derpp["alpha"] * mse
                self.log("train/logit_mse", mse, batch_size=len(pick))
            else:
                loss = loss + replay_ce
            self.log("train/replay_ce", replay_ce, batch_size=len(pick))
        if self.teacher is not None:
            temp = h.distill["temperature"]
            with torch.no_grad():
                old_targets = F.softmax(self.teacher(x)[:, :self.old] / temp, dim=1)
            kd = F.kl_div(F.log_softmax(logits[:, :self.old] / temp, dim=1), old_targets, reduction="batchmean")
            loss = loss + h.distill["weight"] * temp**2 * kd
            self.log("train/distill", kd, batch_size=x.shape[0])
        self.log("train/new_ce", new_loss, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    # -- evaluation over the classes seen so far -------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.eval_correct.zero_()
        self.eval_total.zero_()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        labels = batch["label"]
        logits = self.model(eval_view(self.model.embed(batch[self.input_key]), self.aug))[:, :self.seen]
        right = logits.argmax(1) == self.slot_of[labels]
        counts = self.on_device(self.counts)
        n = len(counts["eval_total"])
        counts["eval_total"] += torch.bincount(labels, minlength=n)
        counts["eval_correct"] += torch.bincount(labels[right], minlength=n)

    def on_validation_epoch_end(self) -> None:
        counts = self.on_device(self.counts)
        for k in ("eval_correct", "eval_total"):
            counts[k] = self.trainer.strategy.reduce(counts[k], reduce_op="sum")
        correct, total = counts["eval_correct"], counts["eval_total"]
        self.log("val/acc1", correct.sum().float() / total.sum().clamp(min=1), prog_bar=True)
        self.log("val/samples", total.sum().float())

    def on_train_end(self) -> None:
        counts = self.on_device(self.counts)
        counts["train"] = self.trainer.strategy.reduce(counts["train"], reduce_op="sum")

    def exported_model(self, net: nn.Module) -> nn.Module:
        """A copy whose head rows are in label order (trained in slot order), so the export is a plain classifier."""
        net = copy.deepcopy(net)
        head = net.vit.head
        with torch.no_grad():
            head.weight.copy_(head.weight[self.slot_of.to(head.weight.device)])
            head.bias.copy_(head.bias[self.slot_of.to(head.bias.device)])
        return net

    # -- what the memory update reads ------------------------------------------------------------
    @torch.no_grad()
    def predict(self, inputs: torch.Tensor, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(pooled features, logits over the seen classes) of raw inputs, on their eval view."""
        was_training = self.training
        self.eval()
        feats, logits = [], []
        for part in inputs.split(batch_size):
            x = eval_view(self.model.embed(part.to(self.device)), self.aug)
            feats.append(self.model.features(x).float().cpu())
            logits.append(self.model(x)[:, :self.seen].float().cpu())
        self.train(was_training)
        return torch.cat(feats).numpy(), torch.cat(logits).numpy()
