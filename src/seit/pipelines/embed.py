"""``task=embed``: a token dataset split -> L2-normalised float16 embeddings (seit.curation.embed)."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from seit.curation.embed import embed_split
from seit.data.datamodule import TokenDataModule
from seit.pipelines.tokenize import prepare_token_dataset
from seit.utils.ranks import rank_world
from seit.utils.summary import config_hash, write_summary


def embed(cfg: DictConfig) -> dict:
    if cfg.data.kind != "tokens":
        raise ValueError(f"task=embed reads a token dataset; data.kind={cfg.data.kind!r}")
    prepare_token_dataset(cfg)  # builds the dataset first when it is missing and data.build.source is set
    dm = TokenDataModule(cfg.data, seed=cfg.seed)
    info = dm.load_info()
    t = cfg.task
    start = time.perf_counter()
    store = embed_split(info, t.split, t.checkpoint, t.out_dir, batch_size=int(t.batch_size), device=str(t.device),
                        features=str(t.features), thumbnail_grid=int(t.thumbnail_grid), whiten=int(t.whiten), whiten_sample=int(t.whiten_sample))
    wall = time.perf_counter() - start
    summary = {"task": "embed", "embeddings": str(store.root), "num_samples": len(store), "dim": store.meta["dim"],
               "model_kind": store.meta["model_kind"], "wall_s": round(wall, 3), "config_hash": config_hash(cfg),
               "output_dir": str(cfg.paths.output_dir)}
    if rank_world()[0] == 0:
        write_summary(Path(cfg.paths.output_dir), summary)
        print(f"final: {len(store)} embeddings of dim {store.meta['dim']} in {store.root} ({wall:.1f}s)", flush=True)
    return summary
