"""The locality feed-forward and the grid-size curriculum (Irandoust et al. 2022)."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, Dataset

from conftest import StopAfterEpoch

from seit.data.batch_schedule import BatchSchedule
from seit.models.locality import LocalityMlp, track_grid
from seit.models.vit import TokenViT
from seit.tasks.classification import ClassificationTask
from seit.tasks.curriculum import GridCurriculum


def token_vit(**kw) -> TokenViT:
    args = dict(input="tokens", input_size=14, num_classes=5, embed_dim=24, depth=2, num_heads=2,
                codebook_size=16, codebook_dim=4, mlp_layer="locality")
    return TokenViT(**{**args, **kw})


# -- locality MLP ---------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(3, 3), (5, 5), (7, 7), (4, 6)])
def test_locality_mlp_runs_on_every_grid_and_sees_it(grid):
    model = token_vit()
    h, w = grid
    out = model(torch.randn(2, 4, 2 * h, 2 * w))  # the k4 s2 stem halves the map
    assert out.shape == (2, 5)
    assert all(block.mlp.grid_source.grid == grid for block in model.vit.blocks)


def test_locality_mlp_on_pixels_follows_the_patch_grid():
    model = TokenViT(input="pixels", input_size=32, num_classes=3, embed_dim=24, depth=1, num_heads=2, patch_size=8,
                     mlp_layer="locality")
    for side in (16, 24, 32):
        images = torch.randint(0, 255, (1, 3, side, side), dtype=torch.uint8)
        assert model(model.embed(images)).shape == (1, 3)
        assert model.vit.blocks[0].mlp.grid_source.grid == (side // 8, side // 8)


def test_class_token_passes_the_locality_mlp_unchanged():
    mlp = LocalityMlp(8, 32, num_prefix_tokens=1)
    x = torch.randn(2, 1 + 16, 8)
    out = mlp(x)
    assert out.shape == x.shape
    assert torch.equal(out[:, 0], torch.zeros(2, 8))  # zero update: the residual keeps the class token
    other = x.clone()
    other[:, 0] = 100.0
    assert torch.allclose(mlp(other)[:, 1:], out[:, 1:])  # and the class token does not leak into patches


def test_class_token_untouched_inside_a_timm_vit_block():
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=0,
                            mlp_layer=LocalityMlp, dynamic_img_size=True)
    track_grid(vit)
    block = vit.blocks[0]
    tokens = vit._pos_embed(vit.patch_embed(torch.randn(2, 3, 16, 16)))
    after_attn = tokens + block.attn(block.norm1(tokens))
    assert torch.allclose(block(tokens)[:, 0], after_attn[:, 0], atol=1e-6)
    assert not torch.allclose(block(tokens)[:, 1:], after_attn[:, 1:])


def test_locality_mlp_is_local_and_has_the_papers_parts():
    mlp = LocalityMlp(8, 32)
    assert mlp.fc1.bias is None and mlp.fc2.bias is None and mlp.conv.groups == 32 and mlp.conv.kernel_size == (3, 3)
    x = torch.randn(1, 25, 8)
    out = mlp(x)
    y = x.clone()
    y[:, 0] += 1.0  # the top-left patch of the 5x5 grid: only its 3x3 neighbourhood may change
    changed = (mlp(y) - out).abs().sum(-1)[0].reshape(5, 5) > 1e-6
    assert changed[:2, :2].all() and not changed[2:].any() and not changed[:, 2:].any()


def test_a_deep_copy_reads_its_own_grid():
    """timm's model EMA deep-copies the model: its locality MLPs must follow its own inputs."""
    model = token_vit()
    ema = copy.deepcopy(model)
    model(torch.randn(1, 4, 6, 6))
    assert ema(torch.randn(1, 4, 14, 14)).shape == (1, 5)
    assert ema.vit.blocks[0].mlp.grid_source.grid == (7, 7) and model.vit.blocks[0].mlp.grid_source.grid == (3, 3)


def test_unknown_layer_name_is_refused_with_the_names():
    with pytest.raises(ValueError, match="model.mlp_layer=localty.*locality"):
        token_vit(mlp_layer="localty")


# -- position embedding across grids --------------------------------------------------------------
@pytest.mark.parametrize("grid", [(1, 1), (3, 3), (5, 5), (4, 6)])
def test_resampled_position_embedding_preserves_a_constant_field(grid):
    model = token_vit()
    with torch.no_grad():
        model.vit.pos_embed.fill_(0.37)
    h, w = grid
    pos = model.vit._pos_embed(torch.zeros(1, h, w, 24))  # the model's own bicubic resampling
    assert pos.shape == (1, h * w, 24)
    assert torch.allclose(pos, torch.full_like(pos, 0.37), atol=1e-5)


def test_position_embedding_at_the_final_grid_is_the_parameter_itself():
    model = token_vit()
    pos = model.vit._pos_embed(torch.zeros(1, 7, 7, 24))
    assert torch.equal(pos, model.vit.pos_embed.expand_as(pos))


# -- the curriculum ---------------------------------------------------------------------------------
def test_curriculum_sizes_per_epoch_in_both_forms():
    paper = GridCurriculum.from_config({"start": 32, "step": 32, "every": 5}, final=224, stride=16)
    assert [paper.size_at(e) for e in (0, 4, 5, 9, 10, 29, 30, 299)] == [32, 32, 64, 64, 96, 192, 224, 224]
    steps = GridCurriculum.from_config({"steps": [[0, 8], [5, 16], [10, 24], [15, 32]]}, final=32, stride=2)
    assert [steps.size_at(e) for e in (0, 4, 5, 14, 15, 100)] == [8, 8, 16, 24, 32, 32]
    assert steps.describe() == "epochs 0-4: 8, 5-9: 16, 10-14: 24, 15+: 32"
    assert steps.eval_size_at(0) == 32
    current = GridCurriculum.from_config({"steps": [[0, 8], [2, 32]], "eval_on_final_size": False}, final=32, stride=2)
    assert current.eval_size_at(1) == 8 and current.eval_size_at(2) == 32
    assert GridCurriculum.from_config({"steps": None, "start": None}, final=32, stride=2) is None
    batches = GridCurriculum.from_config({"steps": [[0, 8], [3, 32]], "batch_sizes": [[0, 256], [9, 192]]}, final=32,
                                         stride=2)
    assert [batches.batch_size_at(e) for e in (0, 8, 9, 50)] == [256, 256, 192, 192] and steps.batch_size_at(3) is None
    assert batches.describe() == "epochs 0-2: 8, 3+: 32; batch per device: epochs 0-8: 256, 9+: 192"


@pytest.mark.parametrize("cfg, message", [
    ({"steps": [[1, 8]]}, "start at epoch 0"),
    ({"steps": [[0, 8], [0, 16]]}, "must increase"),
    ({"steps": [[0, 7]]}, "multiple of the model's patch stride 2"),
    ({"steps": [[0, 40]]}, "final crop 32"),
    ({"start": 8}, "needs step > 0 and every > 0"),
    ({"start": 8, "step": 8, "every": 1, "steps": [[0, 8]]}, "not both"),
    ({"sizes": [[0, 8]]}, "unknown task.curriculum keys"),
    ({"steps": [[0, 8]], "batch_sizes": [[1, 64]]}, "batch_sizes epochs must start at 0"),
    ({"steps": [[0, 8]], "batch_sizes": [[0, 0]]}, "batch_sizes must be >= 1"),
    ({"batch_sizes": [[0, 64]]}, "needs a size schedule"),
])
def test_bad_curricula_are_refused_by_key(cfg, message):
    with pytest.raises(ValueError, match=message):
        GridCurriculum.from_config(cfg, final=32, stride=2)


class TokenGrids(Dataset):
    """Fixed random id grids whose label is decided by their top-left id (learnable)."""

    def __init__(self, n: int = 24, grid: int = 8, codes: int = 16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, codes, (n, grid, grid), generator=g)
        self.labels = self.ids[:, 0, 0] % 3

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"ids": self.ids[i], "label": self.labels[i]}


WARMUP_COSINE = {"_target_": "seit.tasks.schedule.warmup_cosine", "_partial_": True, "warmup_epochs": 1}


def make_task(curriculum: dict | None, scheduler: dict | None = WARMUP_COSINE) -> ClassificationTask:
    task = ClassificationTask(
        model={"_target_": "seit.models.vit.TokenViT", "input": "tokens", "embed_dim": 16, "depth": 2,
               "num_heads": 2, "mlp_layer": "locality", "drop_path_rate": 0.1},
        aug={"crop": 6, "rrc": {"enabled": True}, "mix": {"cutmix_alpha": 1.0}},
        data={"kind": "tokens", "num_classes": 3, "input_grid": 8, "batch_size": 4, "codebook_size": 16,
              "codebook_dim": 4},
        optim={"_target_": "seit.tasks.optim.create_optimizer", "_partial_": True, "opt": "adamw", "lr": 1e-3},
        scheduler=scheduler,
        curriculum=curriculum, ema_decay=0.9, seed=3)
    task.load_codebook(torch.randn(16, 4, generator=torch.Generator().manual_seed(1)))
    return task


class SeenSizes(pl.Callback):
    def __init__(self):
        self.sizes: dict[int, set[int]] = {}
        self.batches: dict[int, set[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x, _ = pl_module.train_batch(batch)
        self.sizes.setdefault(trainer.current_epoch, set()).add(x.shape[-1])
        self.batches.setdefault(trainer.current_epoch, set()).add(x.shape[0])


def fit(task, max_epochs: int, callbacks=(), ckpt_path=None) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=list(callbacks), deterministic=True)
    trainer.fit(task, datamodule=GridsModule(), ckpt_path=ckpt_path)
    return trainer


class GridsModule(BatchSchedule, pl.LightningDataModule):
    cfg = type("DataConfig", (), {"batch_size": 4})

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TokenGrids(), batch_size=self.train_batch_size(), shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TokenGrids(8), batch_size=4)


CURRICULUM = {"steps": [[0, 2], [1, 4], [3, 6]]}


def test_training_crop_follows_the_curriculum_and_validation_stays_final():
    task, seen = make_task(CURRICULUM), SeenSizes()
    eval_sizes = []
    task.model.vit.register_forward_pre_hook(lambda m, args: None if m.training else eval_sizes.append(args[0].shape[-1]))
    fit(task, 4, [seen])
    assert seen.sizes == {0: {2}, 1: {4}, 2: {4}, 3: {6}}
    assert set(eval_sizes) == {6}


def test_resume_across_a_size_change_is_exact(tmp_path):
    torch.manual_seed(0)
    reference = make_task(CURRICULUM)
    fit(reference, 4)

    torch.manual_seed(0)
    first = make_task(CURRICULUM)
    trainer = fit(first, 4, [StopAfterEpoch(1)])  # stops mid-curriculum, before the change at epoch 3
    assert trainer.current_epoch == 2
    trainer.save_checkpoint(tmp_path / "mid.ckpt")

    resumed = make_task(CURRICULUM)
    fit(resumed, 4, ckpt_path=str(tmp_path / "mid.ckpt"))
    want, got = reference.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_batch_size_steps_rebuild_the_loader_each_epoch():
    task, seen = make_task({**CURRICULUM, "batch_sizes": [[0, 4], [2, 8]]}, scheduler=None), SeenSizes()
    fit(task, 4, [seen])
    assert seen.batches == {0: {4}, 1: {4}, 2: {8}, 3: {8}}
    assert seen.sizes == {0: {2}, 1: {4}, 2: {4}, 3: {6}}


def test_batch_size_steps_refuse_a_cosine_over_epochs():
    with pytest.raises(ValueError, match="scheduler.horizon=budget"):
        make_task({**CURRICULUM, "batch_sizes": [[0, 4], [2, 8]]})


def test_curriculum_needs_rrc():
    with pytest.raises(ValueError, match="aug.rrc.enabled=true"):
        ClassificationTask(
            model={"_target_": "seit.models.vit.TokenViT", "input": "tokens", "embed_dim": 16, "depth": 1,
                   "num_heads": 2},
            aug={"crop": 6}, data={"kind": "tokens", "num_classes": 3, "input_grid": 8, "batch_size": 4,
                                   "codebook_size": 16, "codebook_dim": 4},
            optim={"_target_": "seit.tasks.optim.create_optimizer", "_partial_": True, "lr": 1e-3},
            curriculum=CURRICULUM)
