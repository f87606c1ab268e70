"""``task=predict``: image files or folders -> a top-k CSV through a trained classifier and its
tokenizer (``seit.predict``), plus a summary.json with the counts."""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from seit.predict import predict as predict_images
from seit.predict import write_csv
from seit.utils.summary import config_hash, write_summary

log = logging.getLogger(__name__)


def predict(cfg: DictConfig) -> dict:
    t = cfg.task
    images = OmegaConf.to_container(t.images) if isinstance(t.images, ListConfig) else str(t.images)
    classes = t.get("classes")
    classes = OmegaConf.to_container(classes) if isinstance(classes, ListConfig) else classes
    start = time.perf_counter()
    rows = predict_images(t.checkpoint, images, tokenizer=t.get("tokenizer"), topk=int(t.topk),
                          batch_size=int(t.batch_size), device=str(t.device), classes=classes,
                          skip_bad_images=bool(t.skip_bad_images), workers=int(t.workers))
    wall = time.perf_counter() - start
    out = write_csv(rows, t.out)
    top1 = Counter(row["rank1_class"] for row in rows)
    summary = {"task": "predict", "checkpoint": str(t.checkpoint), "tokenizer": rows.tokenizer,
               "predictions": str(out), "num_images": len(rows), "skipped": len(rows.skipped),
               "skipped_images": rows.skipped, "topk": len(rows.columns) // 2,
               "top1_counts": dict(top1.most_common()), "wall_s": round(wall, 3),
               "images_per_s": round(len(rows) / wall, 2) if wall else None, "config_hash": config_hash(cfg),
               "output_dir": str(cfg.paths.output_dir)}
    write_summary(Path(cfg.paths.output_dir), summary)
    skipped = f", {len(rows.skipped)} unreadable skipped" if rows.skipped else ""
    print(f"final: {len(rows)} images predicted in {wall:.1f}s{skipped}", flush=True)
    print(f"predictions: {out}", flush=True)
    return summary
