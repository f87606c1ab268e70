"""Loader throughput per CPU core: token shards vs a JPEG decode + RandomResizedCrop pipeline.

Both sides read the same images (the token dataset must have been built from them) in one
process with one thread, so samples/s is per core; the ratio is measured side by side in one run.

    python run.py task=tokenize experiment=in200_storage     # builds the token dataset once
    python experiments/bench_loader.py --images ../shared/data/imagenet-samples-200 \
        --tokens data_cache/tokens/in200_patch_kmeans_s256p8k512

The token side yields device-ready uint16 id batches (the codebook lookup and the augmentations
run on the accelerator); the JPEG side yields normalised float tensors from
RandomResizedCrop(224) + horizontal flip, the standard ImageNet training transform.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from seit.data.dataset_info import TokenDatasetInfo  # noqa: E402
from seit.data.image_source import IMAGE_EXTS  # noqa: E402
from seit.data.token_stream import TokenStream  # noqa: E402


def bench_tokens(root: str, samples: int, batch_size: int) -> float:
    info = TokenDatasetInfo.open(root)
    split = next(iter(info.meta["splits"]))
    stream = TokenStream(info.shards(split), info.shard_paths(split), codec=info.codec,
                         codebook_size=info.codebook_size, grid=info.grid, chunk_size=info.meta["chunk_size"],
                         batch_size=batch_size, train=True, num_workers=0, shuffle_buffer=1024)
    stream.batches_per_worker = -(-samples // batch_size)
    start, n = time.perf_counter(), 0
    for batch in stream:
        n += batch["ids"].shape[0]
    return n / (time.perf_counter() - start)


def bench_jpeg(images: str, samples: int) -> float:
    from torchvision import transforms

    files = sorted(p for p in Path(images).rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise SystemExit(f"no images under {images}")
    transform = transforms.Compose([
        transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    start = time.perf_counter()
    for i in range(samples):
        with Image.open(files[i % len(files)]) as img:
            transform(img.convert("RGB"))
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="the JPEG folder the token dataset was built from")
    parser.add_argument("--tokens", required=True, help="the token dataset dir")
    parser.add_argument("--jpeg-samples", type=int, default=600)
    parser.add_argument("--token-samples", type=int, default=50000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    for p in (args.images, args.tokens):
        if not os.path.exists(p):
            raise SystemExit(f"{p} not found (see the usage at the top of {__file__})")
    torch.set_num_threads(1)
    bench_tokens(args.tokens, 2048, args.batch_size)  # warm-up: imports, file cache
    token_rate = bench_tokens(args.tokens, args.token_samples, args.batch_size)
    jpeg_rate = bench_jpeg(args.images, args.jpeg_samples)
    result = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, 1 core used",
              "token_samples_per_s_per_core": round(token_rate, 1), "jpeg_rrc_samples_per_s_per_core": round(jpeg_rate, 1),
              "ratio": round(token_rate / jpeg_rate, 1), "tokens": args.tokens, "images": args.images}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
