"""Reconstruction PSNR of a saved tokenizer on an image folder (encode -> decode at its resolution).

    python experiments/tokenizer_psnr.py data_cache/tokens/in200_patch_kmeans_s256p8k512.tokenizer.safetensors \
        ../shared/data/imagenet-samples-200

A storage figure means little without the quality of the tokens behind it; this gives that number.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from seit.data.image_source import load_image, scan_source  # noqa: E402
from seit.tokenizers import load_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tokenizer")
    parser.add_argument("images")
    parser.add_argument("--split", default=None, help="which split of the folder (default: the last one, e.g. val)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resolution for fully convolutional tokenizers (default: the one it was saved with)")
    parser.add_argument("--copy-margin", type=float, default=0.0,
                        help="rate-aware lookup of a learned VQ tokenizer (tokenizer.copy_margin)")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    if args.copy_margin:
        tokenizer.copy_margin = args.copy_margin
    if args.image_size:
        if not getattr(tokenizer, "any_size", False):
            raise SystemExit(f"{args.tokenizer} ({tokenizer.kind}) only works at {tokenizer.image_size} px")
        tokenizer.image_size = args.image_size
    splits, _ = scan_source(args.images)
    records = splits[args.split or list(splits)[-1]]
    psnrs = []
    for start in range(0, len(records), 32):
        x = torch.from_numpy(np.stack([load_image(r, tokenizer.image_size) for r in records[start:start + 32]])) / 255
        with torch.inference_mode():
            y = tokenizer.decode(tokenizer.encode(x))
        mse = (y - x).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        psnrs += (10 * torch.log10(1 / mse)).tolist()
    print(json.dumps({"tokenizer": args.tokenizer, "images": len(psnrs), "resolution": tokenizer.image_size,
                      "copy_margin": getattr(tokenizer, "copy_margin", None),
                      "psnr_db_mean": round(float(np.mean(psnrs)), 2)}, indent=2))


if __name__ == "__main__":
    main()
