"""DINOv2's objective on tokens: targets, losses, crops and masks, the teacher, resume, distillation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from conftest import StopAfterEpoch

from seit.models.dino import (DinoHead, SoftmaxCenter, block_masks, dino_loss, ibot_loss, koleo_loss, mask_ratios,
                              sinkhorn_knopp)
from seit.tasks.dino import DinoTask, DistillTask, cosine_ramp
from seit.utils.knn import knn_predict

OPTIM = {"_target_": "seit.tasks.optim.create_optimizer", "_partial_": True, "opt": "adamw", "lr": 1e-3,
         "weight_decay": 0.04}
SCHEDULER = {"_target_": "seit.tasks.schedule.warmup_cosine", "_partial_": True, "warmup_epochs": 1}
TASK = dict(
    model={"_target_": "seit.models.vit.TokenViT", "input": "tokens", "embed_dim": 16, "depth": 2, "num_heads": 2,
           "drop_path_rate": 0.1, "init_values": 1e-5},
    aug={"crop": 8, "rrc": {"ratio": [0.75, 1.3333]}, "noise": {"prob": 0.5}},
    data={"kind": "tokens", "num_classes": 3, "input_grid": 10, "batch_size": 4, "codebook_size": 16,
          "codebook_dim": 4},
    optim=OPTIM, scheduler=SCHEDULER,
    crops={"global_size": 8, "global_scale": [0.32, 1.0], "local_number": 2, "local_size": 4,
           "local_scale": [0.05, 0.32]},
    heads={"prototypes": 32, "hidden": 24, "bottleneck": 8, "layers": 3},
    loss={"dino_weight": 1.0, "ibot_weight": 1.0, "koleo_weight": 0.1, "student_temp": 0.1,
          "centering": "sinkhorn_knopp", "sinkhorn_iterations": 3, "center_momentum": 0.9},
    teacher={"checkpoint": None, "momentum": 0.994, "momentum_end": 1.0, "temp": 0.07, "warmup_temp": 0.04,
             "warmup_temp_epochs": 1},
    masks={"probability": 0.5, "ratio": [0.1, 0.5], "min_patches": 2},
    weight_decay_end=0.2, freeze_last_layer_epochs=1, knn={"k": 3, "temperature": 0.07}, seed=5)
CODEBOOK = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))


def make_task(cls=DinoTask, **overrides) -> DinoTask:
    task = cls(**{**TASK, **overrides})
    task.load_codebook(CODEBOOK)
    return task


def batch(n: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"ids": torch.randint(0, 16, (n, 10, 10), generator=g), "label": torch.arange(n) % 3}


# -- teacher targets and losses ------------------------------------------------------------------
def test_sinkhorn_knopp_is_doubly_stochastic():
    scores = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    q = sinkhorn_knopp(scores, temperature=0.1, iterations=200)
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-5)  # every sample a distribution
    assert torch.allclose(q.sum(0), torch.full((16,), 64 / 16), atol=1e-3)  # every prototype an equal share
    cosines = torch.tanh(scores)  # what a DINO head gives
    three = sinkhorn_knopp(cosines, temperature=0.07, iterations=3)  # DINOv2's 3 steps: rows exact, columns close
    assert torch.allclose(three.sum(1), torch.ones(64), atol=1e-5)
    plain = torch.softmax(cosines / 0.07, 1).sum(0)
    assert (three.sum(0) - 4).abs().mean() < 0.25 * (plain - 4).abs().mean()
    assert torch.allclose(sinkhorn_knopp(scores + 50.0, 0.1, 3), sinkhorn_knopp(scores, 0.1, 3), rtol=1e-3, atol=1e-6)  # no overflow
    assert torch.isfinite(sinkhorn_knopp(scores * 1000.0, 0.04)).all()  # nor NaN when exp underflows


def test_softmax_centering_subtracts_an_ema_of_the_mean():
    center = SoftmaxCenter(4, momentum=0.9)
    scores = torch.tensor([[1.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    first = center(scores, temperature=1.0)
    assert torch.allclose(first, torch.softmax(scores, 1))  # the centre starts at zero
    assert torch.allclose(center.center, torch.tensor([[0.2, 0.0, 0.0, 0.0]]))
    assert torch.allclose(center(scores, 1.0), torch.softmax(scores - torch.tensor([[0.2, 0, 0, 0]]), 1))


def test_koleo_on_a_known_configuration():
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert koleo_loss(square).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    assert koleo_loss(3 * square).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)  # on the sphere
    pair = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])  # nearest distances sqrt(0.8), sqrt(0.8), sqrt(3.2)
    want = -(2 * math.log(math.sqrt(0.8)) + math.log(math.sqrt(3.2))) / 3
    assert koleo_loss(pair).item() == pytest.approx(want, abs=1e-6)


def test_dino_loss_skips_a_global_crop_against_itself():
    t = [torch.softmax(torch.randn(3, 5), 1) for _ in range(2)]
    s = [torch.randn(3, 5) for _ in range(3)]  # 2 global crops, 1 local
    want = 0.0
    for i, j in [(0, 1), (0, 2), (1, 0), (1, 2)]:
        want += -(t[i] * torch.log_softmax(s[j] / 0.1, 1)).sum(1).mean()
    assert dino_loss(s, t, 0.1).item() == pytest.approx(want.item() / 4, rel=1e-6)
    assert dino_loss([x.bfloat16() for x in s], t).dtype == torch.float32  # reduced in fp32 under bf16


def test_ibot_loss_counts_each_image_once():
    s, t = torch.randn(3, 4), torch.softmax(torch.randn(3, 4), 1)
    weight = torch.tensor([0.5, 0.5, 1.0])  # image 0 has 2 selected patches, image 1 one
    ce = -(t * torch.log_softmax(s / 0.1, 1)).sum(1)
    assert ibot_loss(s, t, weight, images=4).item() == pytest.approx(((ce[0] + ce[1]) / 2 + ce[2]).item() / 4, rel=1e-6)


def test_dino_head_projects_onto_unit_prototypes():
    head = DinoHead(8, prototypes=10, hidden=12, bottleneck=6)
    out = head(torch.randn(5, 8))
    assert out.shape == (5, 10) and out.abs().max() <= 1 + 1e-5  # cosines
    with pytest.raises(ValueError, match="layers"):
        DinoHead(8, prototypes=10, layers=0)


# -- crops and masks -----------------------------------------------------------------------------
def test_mask_ratios_share_and_range():
    r = mask_ratios(100, 0.5, 0.1, 0.5, torch.Generator().manual_seed(0))
    masked = r[r > 0]
    assert len(masked) == 50 and masked.min() >= 0.1 and masked.max() <= 0.5
    assert masked.max() - masked.min() > 0.3  # spread over the range, one draw per bin


def test_block_masks_stay_within_their_target_and_are_blocks():
    g = torch.Generator().manual_seed(0)
    ratios = torch.tensor([0.0, 0.1, 0.3, 0.5] * 50)
    masks = block_masks(ratios, 7, 7, g, min_patches=4)
    counts = masks.flatten(1).sum(1)
    assert (counts[ratios == 0] == 0).all()
    assert (counts <= torch.floor(ratios * 49)).all()
    assert (counts[ratios == 0.5] > 0).all() and counts[ratios == 0.5].float().mean() > 0.6 * 24
    one_block = block_masks(torch.tensor([0.3]), 7, 7, torch.Generator().manual_seed(3), tries=1)[0]
    rows, cols = one_block.any(1).nonzero(), one_block.any(0).nonzero()  # a single rectangle fills its bounding box
    assert one_block.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_crops_take_their_grids_and_the_vit_takes_every_grid():
    task = make_task()
    g = torch.Generator().manual_seed(0)
    x = task.source(batch())
    globals_ = task.views(x, 8, [0.32, 1.0], 2, g)
    locals_ = task.views(x, 4, [0.05, 0.32], 2, g)
    assert globals_.shape == (8, 4, 8, 8) and locals_.shape == (8, 4, 4, 4)
    cls, patches = task.student.tokens(globals_, task.student_masks(8, g))
    assert cls.shape == (8, 16) and patches.shape == (8, 16, 16)  # the k4 s2 stem: 8x8 ids -> 4x4 patches
    cls, patches = task.student.tokens(locals_)
    assert cls.shape == (8, 16) and patches.shape == (8, 4, 16)


def test_a_masked_patch_reads_the_mask_token():
    task = make_task()
    x = task.views(task.source(batch()), 8, [1.0, 1.0], 1, torch.Generator().manual_seed(0))
    mask = torch.zeros(4, 4, 4, dtype=torch.bool)
    mask[:, 0, 0] = True
    with torch.no_grad():
        token = 3 * torch.randn(task.student.mask_token.shape, generator=torch.Generator().manual_seed(0))
        task.student.mask_token.copy_(token)  # not constant: LayerNorm would cancel a constant vector
        _, a = task.student.tokens(x, mask)
        _, b = task.student.tokens(x)
        task.student.mask_token.copy_(-token)
        _, c = task.student.tokens(x, mask)
    assert not torch.allclose(a[:, 0], b[:, 0]) and not torch.allclose(a[:, 0], c[:, 0])


# -- the teacher -----------------------------------------------------------------------------------
def test_teacher_gets_no_gradient_and_its_ema_step_is_exact():
    task = make_task()
    task.train()
    loss = task.training_step(batch(), 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None and not p.requires_grad for p in task.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.student.backbone.parameters())
    with torch.no_grad():
        for p in task.student.parameters():
            p.add_(0.01)
    before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    task.update_teacher(0.9)
    student = task.student.state_dict()
    for name, value in task.teacher.state_dict().items():
        assert torch.equal(value, torch.lerp(before[name], student[name], 0.1)), name
        assert torch.allclose(value, 0.9 * before[name] + 0.1 * student[name], atol=1e-6), name
    assert not task.teacher.training  # no drop-path in the teacher
    task.train()
    assert not task.teacher.training and task.student.training


def test_schedules():
    assert cosine_ramp(0.994, 1.0, 0.0) == pytest.approx(0.994)
    assert cosine_ramp(0.994, 1.0, 0.5) == pytest.approx(0.997)
    assert cosine_ramp(0.994, 1.0, 1.0) == pytest.approx(1.0)
    assert cosine_ramp(0.04, 0.2, 2.0) == pytest.approx(0.2)


def test_leave_one_out_knn_never_counts_a_sample_itself():
    features = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]], np.float32)
    labels = np.array([0, 0, 1, 1])
    scores = knn_predict(features, labels, features, 1, 0.07, 2, exclude_self=True)
    assert (scores.argmax(1) == labels).all()
    alone = knn_predict(features, np.array([0, 1, 0, 1]), features, 1, 0.07, 2, exclude_self=True)
    assert (alone.argmax(1) == np.array([1, 0, 1, 0])).all()  # its only neighbour votes, not itself


# -- Lightning: resume, distillation -------------------------------------------------------------
class Grids(Dataset):
    def __init__(self, n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 16, (n, 10, 10), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"ids": self.ids[i], "label": i % 3}


class GridsModule(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(Grids(), batch_size=4, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(Grids(9, seed=1), batch_size=4)


def fit(task, epochs: int, callbacks=(), ckpt_path=None) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=list(callbacks), deterministic=True)
    trainer.fit(task, datamodule=GridsModule(), ckpt_path=ckpt_path)
    return trainer


def test_training_moves_the_student_and_the_teacher_follows():
    torch.manual_seed(0)
    task = make_task()
    start = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    prototypes = task.student.dino_head.prototypes.detach().clone()
    trainer = fit(task, 2, [FreezeCheck(prototypes)])
    moved = [k for k, v in task.teacher.state_dict().items() if not torch.equal(v, start[k])]
    assert moved and "backbone.vit.blocks.0.attn.qkv.weight" in moved
    assert 0 <= trainer.callback_metrics["val/knn_acc1"] <= 1
    assert trainer.callback_metrics["train/teacher_momentum"] > 0.994


class FreezeCheck(pl.Callback):
    """The prototypes take no step during the first epoch, and do after it."""

    def __init__(self, start: torch.Tensor):
        self.start = start

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        same = torch.equal(pl_module.student.dino_head.prototypes.detach(), self.start)
        assert same == (trainer.current_epoch == 0)


def test_resume_is_exact(tmp_path):
    torch.manual_seed(0)
    reference = make_task()
    fit(reference, 3)

    torch.manual_seed(0)
    first = make_task()
    trainer = fit(first, 3, [StopAfterEpoch(0)])
    trainer.save_checkpoint(tmp_path / "mid.ckpt")

    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed = make_task()
    fit(resumed, 3, ckpt_path=str(tmp_path / "mid.ckpt"))
    want, got = reference.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_softmax_centering_runs_and_its_centre_is_saved():
    task = make_task(loss={**TASK["loss"], "centering": "softmax"})
    fit(task, 1)
    assert task.dino_center.center.abs().sum() > 0
    assert "dino_center.center" in task.state_dict()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="centering"):
        make_task(loss={**TASK["loss"], "centering": "other"})
    with pytest.raises(ValueError, match="local_size"):
        make_task(crops={**TASK["crops"], "local_size": 8})
    with pytest.raises(ValueError, match="CutMix"):
        make_task(aug={**TASK["aug"], "mix": {"cutmix_alpha": 1.0}})
    with pytest.raises(ValueError, match="teacher.checkpoint"):
        make_task(DistillTask)
    with pytest.raises(ValueError, match="task=distill"):
        make_task(teacher={**TASK["teacher"], "checkpoint": "teacher.safetensors"})


def test_distill_teacher_stays_frozen_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    teacher_run = make_task()
    fit(teacher_run, 1)
    teacher_run.export(tmp_path)
    fingerprint = teacher_run.data.codebook_sha256
    small = {**TASK["model"], "embed_dim": 8, "num_heads": 1, "drop_path_rate": 0.0}
    task = make_task(DistillTask, model=small, teacher={**TASK["teacher"], "checkpoint": str(tmp_path / "dino.safetensors")},
                     masks={**TASK["masks"], "probability": 0.0}, ema_decay=0.9)
    frozen = {k: v.clone() for k, v in task.state_dict().items() if k.startswith("teacher")}
    assert frozen and fingerprint is None  # an in-memory dataset: no fingerprint to compare
    student = {k: v.clone() for k, v in task.student.state_dict().items()}
    fit(task, 2)
    for name, value in task.state_dict().items():
        if name.startswith("teacher"):
            assert torch.equal(value, frozen[name]), name
    assert any(not torch.equal(v, student[k]) for k, v in task.student.state_dict().items())
    assert all(not p.requires_grad for n, p in task.named_parameters() if n.startswith("teacher"))
    # the teacher's heads were used (a DINO export has them), and the EMA is what gets exported
    assert torch.equal(task.teacher_dino_head.prototypes, teacher_run.teacher.dino_head.prototypes.detach())
    assert task.exported() is task.ema.module


def test_distill_refuses_a_teacher_of_another_codebook(tmp_path):
    teacher_run = make_task(data={**TASK["data"], "codebook_sha256": "a" * 64})
    teacher_run.export(tmp_path)
    with pytest.raises(ValueError, match=r"task.teacher.checkpoint: .* codebook aaaaaaaaaaaa"):
        make_task(DistillTask, data={**TASK["data"], "codebook_sha256": "b" * 64},
                  teacher={**TASK["teacher"], "checkpoint": str(tmp_path / "dino.safetensors")})


def test_distill_from_a_classifier_uses_fresh_frozen_heads(tmp_path):
    from seit.models.export import save_classifier
    from seit.models.vit import TokenViT

    arch = {"_target_": "seit.models.vit.TokenViT", "input": "tokens", "embed_dim": 12, "depth": 1, "num_heads": 2}
    net = TokenViT(**{k: v for k, v in arch.items() if k != "_target_"}, input_size=8, num_classes=3,
                   codebook_size=16, codebook_dim=4)
    net.embed.load_codebook(CODEBOOK)
    save_classifier(net, tmp_path / "classifier.safetensors", config={"model": arch, "codebook_size": 16,
                    "codebook_dim": 4}, input_size=10, crop=8, classes=["a", "b", "c"], fingerprint=None)
    task = make_task(DistillTask, teacher={**TASK["teacher"], "checkpoint": str(tmp_path / "classifier.safetensors")},
                     ema_decay=0.9)
    assert task.teacher_kind == "classifier" and task.teacher_dino_head.mlp[0].in_features == 12
    before = {k: v.clone() for k, v in task.state_dict().items() if k.startswith("teacher")}
    fit(task, 1)
    assert all(torch.equal(v, before[k]) for k, v in task.state_dict().items() if k.startswith("teacher"))


def test_a_dino_checkpoint_and_its_export_load_as_the_same_backbone(tmp_path):
    from seit.tasks.checkpoint import load_model

    torch.manual_seed(0)
    task = make_task()
    trainer = fit(task, 1)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    task.export(tmp_path)
    ids = batch()["ids"]
    from_ckpt, from_export = load_model(tmp_path / "last.ckpt"), load_model(tmp_path / "dino.safetensors")
    assert from_ckpt.kind == from_export.kind == "dino" and from_ckpt.dim == 16 and from_ckpt.crop == 8
    with torch.no_grad():
        want = task.teacher.eval().tokens(task.source({"ids": ids[:, 1:9, 1:9]}))[0]
        assert torch.equal(from_ckpt.features(ids), from_export.features(ids))
        assert torch.allclose(from_export.features(ids), want, atol=1e-6)  # the EMA teacher, on the centre crop
        assert from_export.grid_features(ids).shape == (4, 16, 5, 5)
    with pytest.raises(ValueError, match="without a classifier head"):
        from_export.logits(ids)
