"""A redundant pool, like web data: tiny-imagenet-20 train plus near-duplicates of ~30% of it.

    python experiments/redundant_pool.py              # images + tokens + injected.json
    python experiments/redundant_pool.py --copydedup  # also: DINOv2 copy-detection dedup, scored

Missing inputs are built first: the tiny20 tokenizer (and tiny20 tokens) by
``run.py task=tokenize experiment=tiny20_tokens``.

Each duplicate is an augmented copy of one original, as web re-uploads are: a random resized crop
keeping 95-100% of the area, a +-5% brightness/contrast/saturation jitter, and a JPEG re-encode at
quality 50-95 (no flips: re-uploads rarely mirror). Copies sit beside their original as
``<wnid>/<stem>_dup.JPEG``; ``tiny20_redundant_k512.injected.json`` beside the token dataset lists the (original, copy)
key pairs. The pool is tokenized with the tiny20 k-means tokenizer, so models trained on tiny20
tokens (e.g. the MTM encoders of mtm_tiny20.py) embed it. The val split is tiny20's own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageEnhance

from resumable_runs import OUT, ROOT

SHARED = OUT.parent / "shared" / "data" / "tiny-imagenet-20"
TOKENIZER = OUT / "data_cache" / "tokens" / "tiny20_patch_kmeans_s64p4k512.tokenizer.safetensors"
IMAGES = OUT / "data_cache" / "tiny20_redundant"
TOKENS = OUT / "data_cache" / "tokens" / "tiny20_redundant_k512"
AREA, JITTER = 0.95, 0.05  # the crop keeps AREA-100% of the image; colours move by +-JITTER
INJECTED = TOKENS.with_suffix(".injected.json")  # beside the dataset: not part of its bytes


def near_duplicate(img: Image.Image, rng: random.Random) -> Image.Image:
    w, h = img.size
    area = rng.uniform(AREA, 1.0) * w * h
    aspect = rng.uniform(3 / 4, 4 / 3)
    cw, ch = min(w, round((area * aspect) ** 0.5)), min(h, round((area / aspect) ** 0.5))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(rng.uniform(1 - JITTER, 1 + JITTER))
    return img


def build_images(fraction: float, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    originals = sorted(p for p in (SHARED / "train").glob("*/*.JPEG"))
    chosen = set(rng.sample(range(len(originals)), round(fraction * len(originals))))
    pairs = []
    for i, src in enumerate(originals):
        wnid, stem = src.parent.name, src.stem
        out_dir = IMAGES / "train" / wnid
        out_dir.mkdir(parents=True, exist_ok=True)
        link = out_dir / src.name
        if not link.exists():
            link.symlink_to(src)
        if i in chosen:
            dup = out_dir / f"{stem}_dup.JPEG"
            if not dup.exists():
                tmp = dup.with_suffix(".tmp")
                near_duplicate(Image.open(src).convert("RGB"), rng).save(tmp, "JPEG", quality=rng.randint(50, 95))
                os.replace(tmp, dup)
            pairs.append((f"{wnid}/{stem}", f"{wnid}/{stem}_dup"))
    if not (IMAGES / "val").exists():
        (IMAGES / "val").symlink_to(SHARED / "val")
    return pairs


# -- DINOv2 copy-detection dedup on the pool (``--copydedup``) ---------------------------------
EMB = Path(f"{TOKENS}.embeddings")
THUMB = ["task.features=thumbnail", "task.thumbnail_grid=8"]
THRESHOLDS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.9)
RELATIVE = (0.45, 0.6, 0.7, 0.8)
EMBEDDINGS = {"thumb": ["task.whiten=64"], "thumb_raw": []}  # whitened 64-d (curation_tiny20.py's) and raw 2048-d


def copydedup_experiment() -> None:
    """Self-dedup over a threshold sweep (scored as the SemDeDup table of curation_tiny20.py), then
    relative dedup of the pool against tiny20 val."""
    from resumable_runs import run_once

    base = ["experiment=tiny20_tokens", f"data.root={TOKENS}", f"data.build.source={IMAGES}", f"tokenizer.checkpoint={TOKENIZER}"]
    embed_runs = OUT / "logs" / "embed" / "runs"
    for name, extra in EMBEDDINGS.items():
        run_once([*base, "task=embed", *THUMB, *extra, f"task.out_dir={EMB / name}"], embed_runs / f"cur20_{name}")
    run_once([*base, "task=embed", *THUMB, "task.split=val", f"task.out_dir={EMB / 'val_thumb_raw'}"],
             embed_runs / "cur20_val_thumb_raw")
    curate = [*base, "task=curate", "curate=copydedup"]
    for name in EMBEDDINGS:
        for t in THRESHOLDS:
            run_once([*curate, f"task.embeddings={EMB / name}", f"curate.threshold={t}"], _copydedup_dir(f"{name}_t{t}"))
    for name in EMBEDDINGS:  # val embedded unwhitened: task=curate whitens it with the pool's PCA when the pool is
        for t in RELATIVE:
            run_once([*curate, f"task.embeddings={EMB / name}", f"curate.reference_embeddings=[{EMB / 'val_thumb_raw'}]",
                      f"curate.relative_threshold={t}"], _copydedup_dir(f"{name}_rel{t}"))
    _copydedup_table()
    _relative_table()


def _copydedup_dir(name: str) -> Path:
    return OUT / "logs" / "curate" / "runs" / f"cur20_copydedup_{name}"


def _copydedup_table() -> None:
    import numpy as np

    pairs = json.loads(INJECTED.read_text())["pairs"]
    all_keys = (EMB / "thumb" / "keys.txt").read_text().splitlines()
    in_pair = {k for p in pairs for k in p}
    clean = len(all_keys) - len(in_pair)
    print("| embedding | threshold | removed | components with copies | largest component | injected pairs found | "
          "removed that are not injected (of removed / of clean images) |\n|---|---:|---:|---:|---:|---:|---:|")
    for name in EMBEDDINGS:
        for t in THRESHOLDS:
            d = _copydedup_dir(f"{name}_t{t}")
            kept = {line.split("\t")[0] for line in (d / "subset.tsv").read_text().splitlines()[1:]}
            stats = json.loads((d / "report.json").read_text())["copydedup"]
            removed = [k for k in all_keys if k not in kept]
            found = np.mean([a not in kept or b not in kept for a, b in pairs])
            fp = sum(k not in in_pair for k in removed)
            print(f"| {name} | {t} | {len(removed)} | {stats['components_with_copies']} | {stats['largest_component']} | "
                  f"{100 * found:.1f}% | {fp} ({100 * fp / max(len(removed), 1):.1f}% / {100 * fp / clean:.1f}%) |")


def _relative_table() -> None:
    n = len((EMB / "thumb" / "keys.txt").read_text().splitlines())
    print(f"| embedding | relative threshold | pool images dropped by relative dedup (of {n}) | then by self-dedup at 0.6 |"
          "\n|---|---:|---:|---:|")
    for name in EMBEDDINGS:
        for t in RELATIVE:
            s = json.loads((_copydedup_dir(f"{name}_rel{t}") / "report.json").read_text())["copydedup"]
            print(f"| {name} | {t} | {s['removed_relative']} ({100 * s['removed_relative'] / n:.1f}%) | {s['removed_self']} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copydedup", action="store_true", help="score DINOv2 copy-detection dedup on the pool")
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"needs the tiny-imagenet-20 images at {SHARED}")
    if not TOKENIZER.is_file():
        tokenize(["experiment=tiny20_tokens"])
    if not (TOKENS / "dataset.json").is_file() or not INJECTED.is_file():
        pairs = build_images(args.fraction, args.seed)
        tokenize(["experiment=tiny20_tokens", f"data.build.source={IMAGES}", f"data.root={TOKENS}",
                  f"tokenizer.checkpoint={TOKENIZER}"])
        INJECTED.write_text(json.dumps({"fraction": args.fraction, "seed": args.seed, "pairs": pairs}))
    print(f"{len(json.loads(INJECTED.read_text())['pairs'])} injected near-duplicate pairs; pool at {TOKENS}")
    if args.copydedup:
        copydedup_experiment()


def tokenize(overrides: list[str]) -> None:
    subprocess.run([sys.executable, "run.py", "task=tokenize", *overrides, "print_config=false"],
                   cwd=ROOT, check=True, env={**os.environ, "SEIT_ROOT": str(OUT)})


if __name__ == "__main__":
    main()
