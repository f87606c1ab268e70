"""The base LightningModule and config-composed assembly: EMA per optimizer step, timm injection
points, any grid, and a new objective from a config alone."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from seit.pipelines.train import instantiate_task
from seit.tasks.base import SeitTask, build_model
from seit.tasks.classification import ClassificationTask

K, D, GRID = 32, 4, 8
MODEL = {"_target_": "seit.models.vit.TokenViT", "name": "t", "input": "tokens", "embed_dim": 16, "depth": 2,
         "num_heads": 2, "drop_path_rate": 0.0}
OPTIM = {"_target_": "seit.tasks.optim.create_optimizer", "_partial_": True, "opt": "adamw", "lr": 1e-3,
         "weight_decay": 0.0}
DATA = {"kind": "tokens", "num_classes": 3, "input_grid": GRID, "batch_size": 4, "codebook_size": K, "codebook_dim": D}


def classifier(**kw) -> ClassificationTask:
    task = ClassificationTask(**{"model": MODEL, "optim": OPTIM, "aug": {"crop": GRID}, "data": DATA, **kw})
    task.load_codebook(torch.randn(K, D, generator=torch.Generator().manual_seed(0)))
    return task


def batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"ids": torch.randint(0, K, (4, GRID, GRID), generator=g), "label": torch.randint(0, 3, (4,), generator=g)}
            for _ in range(n)]


def test_the_ema_updates_once_per_optimizer_step_not_per_micro_batch():
    task = classifier(ema_decay=0.9)
    updates = []
    original = task.ema.update
    task.ema.update = lambda model, step=None: (updates.append(step), original(model, step=step))
    trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches(8), batch_size=None))
    assert trainer.global_step == 2 and updates == [1, 2], updates  # 8 micro-batches, 2 optimizer steps, 2 EMA updates
    assert not torch.equal(task.ema.module.vit.head.weight, task.model.vit.head.weight)  # it lags the model


def test_the_step_generator_depends_on_seed_rank_and_step_only():
    a, b = classifier(seed=3), classifier(seed=3)
    assert torch.equal(torch.rand(4, generator=a.step_generator(7)), torch.rand(4, generator=b.step_generator(7)))
    assert not torch.equal(torch.rand(4, generator=a.step_generator(7)), torch.rand(4, generator=a.step_generator(8)))


def test_injection_points_swap_the_mlp_and_norm_from_config():
    config = {**MODEL, "mlp_layer": {"_target_": "timm.layers.GluMlp", "_partial_": True},
              "norm_layer": "torch.nn.RMSNorm"}
    model = build_model(config, input_size=GRID, num_classes=3, codebook_size=K, codebook_dim=D)
    from timm.layers import GluMlp

    assert isinstance(model.vit.blocks[0].mlp, GluMlp) and isinstance(model.vit.blocks[0].norm1, torch.nn.RMSNorm)
    assert model(model.embed(torch.randint(0, K, (2, GRID, GRID)))).shape == (2, 3)


@pytest.mark.parametrize("grid", [6, 8, 12, 15])
def test_one_model_runs_on_any_grid(grid):
    model = classifier().model
    assert model(model.embed(torch.randint(0, K, (2, grid, grid)))).shape == (2, 3)


def test_data_kind_and_model_input_are_checked_by_the_classes_they_concern():
    with pytest.raises(ValueError, match="model.input='tokens' does not fit data.kind='images'"):
        classifier(data={**DATA, "kind": "images"})
    from seit.tasks.mtm import MTMTask

    with pytest.raises(ValueError, match="learns from tokens, not data.kind='images'"):
        MTMTask(model=MODEL, decoder={}, mask={}, aug={}, data={**DATA, "kind": "images"}, optim=OPTIM)


class ConstantTask(SeitTask):
    """A new objective defined outside seit: module + config, no edit to a builder."""

    def __init__(self, *, width: int, data: dict, optim: dict, seed: int = 0):
        super().__init__(data=data, optim=optim, seed=seed)
        self.model = torch.nn.Linear(width, self.data.num_classes)


def test_a_new_objective_is_a_module_plus_a_config():
    cfg = OmegaConf.create({"_target_": f"{__name__}.ConstantTask", "name": "mine", "metric": "val/x",
                            "global_batch": None, "width": 5, "optim": OPTIM})
    task = instantiate_task(cfg, DATA)
    assert isinstance(task, ConstantTask) and task.model.out_features == 3
    assert isinstance(task.configure_optimizers(), torch.optim.AdamW)
    with pytest.raises(ValueError, match="task.depth is not an argument of .*ConstantTask"):
        instantiate_task(OmegaConf.merge(cfg, {"depth": 3}), DATA)


def test_checkpoints_from_before_the_config_composed_tasks_rebuild():
    old = {"model": {"name": "t", "input": "tokens", "embed_dim": 16, "depth": 2, "num_heads": 2, "codebook_size": K,
                     "codebook_dim": D, "embedding": "codebook", "pretrained": None},
           "optim": {"lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.999], "eps": 1e-8, "warmup_epochs": 1,
                     "min_lr": 1e-5},
           "aug": {"crop": GRID}, "num_classes": 3, "input_grid": GRID, "batch_size": 4, "codebook_sha256": "abc",
           "label_smoothing": 0.1, "ema_decay": 0.0, "compile": False, "seed": 0, "linear_probe": False}
    task = ClassificationTask.from_hparams(old)
    assert task.data.codebook_sha256 == "abc" and task.model.vit.head.out_features == 3
    task.load_state_dict(classifier().state_dict())  # the parameter names did not change
    from seit.tasks.mtm import MTMTask

    old_mtm = {"model": {"embed_dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 4.0, "dropout": 0.1,
                         "decoder_dim": 8, "decoder_depth": 1, "decoder_heads": 2, "decoder_dropout": 0.1},
               "mask": {"mean": 0.45, "std": 0.25, "min": 0.4, "max": 1.0, "drop_ratio": 0.4, "val_ratio": 0.6},
               "optim": dict(old["optim"]), "aug": {"crop": GRID}, "input_grid": GRID, "batch_size": 4,
               "codebook_size": K, "codebook_dim": D, "codebook_sha256": "abc", "smoothing": 0.0, "seed": 0,
               "soft_tau": 0.0}
    mtm = MTMTask.from_hparams(old_mtm)
    assert mtm.model.config["decoder_dim"] == 8 and mtm.model.config["dropout"] == 0.1
    from seit.tasks.tokenadapt import TokenAdaptTask

    with pytest.raises(ValueError, match="written before the config-composed tasks"):
        TokenAdaptTask.from_hparams({"tokenizer": "t.safetensors", "out_grid": 8, "geo": {}, "optim": {}})


def test_an_unimportable_part_or_task_is_named_in_one_line():
    from seit.utils.validate import ConfigError

    with pytest.raises(ConfigError, match=r"^model.mlp_layer=timm.layers.Nope: cannot import it"):
        build_model({**MODEL, "mlp_layer": "timm.layers.Nope"}, input_size=GRID, num_classes=3, codebook_size=K,
                    codebook_dim=D)
    with pytest.raises(ConfigError, match=r"^task._target_=seit.tasks.nope.Nope: cannot import it"):
        instantiate_task(OmegaConf.create({"_target_": "seit.tasks.nope.Nope", "name": "x"}), DATA)
