"""A redundant pool, like web data: tiny-imagenet-20 train plus near-duplicates of ~30% of it.

    python experiments/redundant_pool.py            # images + tokens + injected.json

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not SHARED.is_dir() or not TOKENIZER.is_file():
        sys.exit(f"needs {SHARED} and the tiny20 tokenizer {TOKENIZER} "
                 "(python run.py task=tokenize experiment=tiny20_tokens builds it)")
    pairs = build_images(args.fraction, args.seed)
    subprocess.run([sys.executable, "run.py", "task=tokenize", "experiment=tiny20_tokens", f"data.build.source={IMAGES}",
                    f"data.root={TOKENS}", f"tokenizer.checkpoint={TOKENIZER}", "print_config=false"],
                   cwd=ROOT, check=True, env={**os.environ, "SEIT_ROOT": str(OUT)})
    INJECTED.write_text(json.dumps({"fraction": args.fraction, "seed": args.seed, "pairs": pairs}))
    print(f"{len(pairs)} injected near-duplicate pairs; pool at {TOKENS}")


if __name__ == "__main__":
    main()
