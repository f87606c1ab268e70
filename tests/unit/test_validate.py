"""Config values that cannot work are refused, naming the key, before any work."""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir

from conftest import REPO
from seit.pipelines import checks, run_task
from seit.utils.config import register_resolvers
from seit.utils.validate import ConfigError

register_resolvers()


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("task", ["train", "pretrain_mtm", "continual", "tokenize", "embed"])
def test_the_shipped_defaults_pass(task):
    cfg = config(f"task={task}")
    for check in checks(cfg):
        check(cfg)


@pytest.mark.parametrize("override", [
    "data.batch_size=0", "data.batch_size=-4", "data.batch_size=2.5", "data.eval_batch_size=0",
    "data.num_workers=-1", "trainer.max_epochs=0", "trainer.max_steps=0", "+trainer.limit_train_batches=0",
    "+trainer.limit_train_batches=1.5", "trainer.check_val_every_n_epoch=0", "optim.lr=0", "optim.lr=-1e-3",
    "optim.lr=fast", "optim.blr=0", "optim.weight_decay=-0.1", "scheduler.warmup_epochs=-1", "optim.eps=0",
    "optim.betas=[0.9,1.0]", "optim.lr_scaling=cubic", "optim.layer_decay=1.5", "data.build.shard_size=0",
    "data.build.workers=-2", "task.label_smoothing=1.0", "task.ema_decay=-0.5", "trainer.max_time=abc",
    "trainer.max_time=0", "callbacks.budget.val_every=-5", "scheduler.horizon=steps",
    "scheduler.horizon=budget",  # without trainer.max_time
])
def test_a_value_that_cannot_work_is_refused_naming_its_key(override):
    cfg = config(override)  # task=train: run_task checks before it builds data or a model
    key = override.lstrip("+").split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}="):
        run_task(cfg)


def test_tokenize_checks_only_what_it_reads():
    with pytest.raises(ConfigError, match=r"^data.build.chunk_size="):
        run_task(config("task=tokenize", "data.build.chunk_size=0"))
    cfg = config("task=tokenize", "data.batch_size=0")
    for check in checks(cfg):
        check(cfg)  # tokenize has no loader: not its concern


@pytest.mark.parametrize("overrides, says", [
    ("task=train_tokenizer", "task=train_tokenizer learns from images, not data.kind='tokens': use data=images_"),
    ("task=train_tokenizer data=images_mnist5k", "add tokenizer=vq"),
    ("task=train_tokenadapt data=images_mnist5k", "task=train_tokenadapt needs task.tokenizer=<value>"),
    ("task=train_tokenadapt data=images_mnist5k task.tokenizer=t.safetensors", "needs task.out_grid=<value>"),
    ("task=pretrain_mtm data=images_mnist5k", "task=pretrain_mtm learns from tokens"),
    ("task=convert", "task=convert needs task.seit_dir=<value>"),
    ("task=curate curate=retrieval", "task=curate needs curate.seed_keys=<value>"),
    ("data=images", "task=train needs data.source=<value>"),
])
def test_a_task_says_in_one_line_what_it_needs(overrides, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        run_task(config(*overrides.split()))


@pytest.mark.parametrize("overrides", ["task=train_tokenizer data=images_mnist5k tokenizer=vq",
                                       "task=train_tokenadapt data=images_mnist5k task.tokenizer=t.safetensors "
                                       "task.out_grid=14", "task=pretrain_mtm", "task=curate curate=kmeans",
                                       "data=imagenet"])  # imagenet: data.build.source is needed only to build it
def test_a_complete_config_passes(overrides):
    cfg = config(*overrides.split())
    for check in checks(cfg):
        check(cfg)


@pytest.mark.parametrize("overrides, old", [("+tokenizer.embed_dim=8", "tokenizer.embed_dim"),
                                            ("task=train_tokenizer data=images_mnist5k tokenizer=vq "
                                             "+tokenizer.model.embed_dim=8", "tokenizer.model.embed_dim")])
def test_the_old_name_of_the_codebook_width_is_refused_naming_the_new_one(overrides, old):
    # appended (+key, as Hydra's own error suggests) or set by a config file of one's own: it would be read by nothing
    new = old.replace("embed_dim", "codebook_dim")
    with pytest.raises(ConfigError, match=re.escape(f"{old} is now {new}")):
        run_task(config(*overrides.split()))
