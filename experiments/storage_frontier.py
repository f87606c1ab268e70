"""The storage-accuracy frontier on tiny-imagenet-20 (SeiT's headline figure): val top-1 against
bytes on disk per training image, for the same images stored several ways.

    python experiments/storage_frontier.py                      # build the data variants, train every point, report
    python experiments/storage_frontier.py --points jpeg_q75,res16 --seeds 0
    python experiments/storage_frontier.py --report             # frontier.csv, .md, .png from the runs
    python experiments/storage_frontier.py --dry-run            # build the variants, print bytes and the commands only

Every point trains the same body (``model=micro``) with the same optimiser and budget
(``--epochs`` epochs, default 3, at ``--lr``, default 1e-3; batch 128, 1 warmup epoch, cosine),
and is validated on the 1,000 val images stored the same way as its training images:

- ``tokens_k<K>``: the k-means patch tokens (64 px, 4x4 patches, 16x16 ids, ctx-rans shards),
  ``experiment=tiny20_tokens tokenizer.codebook_size=K``; K=512 is the default dataset.
  Bytes: the train shards plus the dataset's own files (codebook, codec model, synonyms,
  dataset.json), which a copy of the training set needs; the tokenizer checkpoint (only needed
  to tokenize new images) and the val shard are not counted.
- ``jpeg_q<Q>``: every train and val image decoded and re-encoded by Pillow at quality Q
  (4:2:0 chroma subsampling, ``optimize=True`` Huffman tables), ``experiment=tiny20_pixels
  data.source=<variant dir>``. The source files are libjpeg quality 75 without optimised tables.
- ``res<S>``: every image downsampled to SxS (Pillow bicubic, antialiased) and stored as JPEG
  q95 (optimised Huffman); the pixel loader squash-resizes back to 64 px (bicubic) for the model.
  JPEG rather than PNG: lossless PNG costs more bytes than the 64 px source JPEG at 32 px.
- ``subset_<budget>``: a random class-stratified subset of the original train JPEGs whose bytes
  add up to at most the K=512 token training set's bytes (``subset_tok512``) or 4x that
  (``subset_tok512x4``); val is the original val JPEGs. It trains for the same number of optimizer
  steps as the full-data points (ceil(steps / steps per epoch) epochs, warmup = the same steps),
  validated once, at its end.

Bytes are measured from the files written: the sum of the train split's file sizes, per training
image and in total. Data variants go to data_cache/storage_frontier/<point>/ (train/ and val/
ImageFolder trees plus variant.json), runs to experiments/results/storage_frontier/runs/<tag>/
<point>_s<seed>/ (tag = e<epochs>); a point whose run dir holds summary.json is skipped, so a
rerun resumes. Two runs at a time (``--jobs``), one torch thread each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from resumable_runs import OUT, ROOT

RESULTS = OUT / "experiments" / "results" / "storage_frontier"
DATA = OUT / "data_cache" / "storage_frontier"
TOKENS = OUT / "data_cache" / "tokens"
SOURCE = (ROOT / ".." / "shared" / "data" / "tiny-imagenet-20").resolve()
SPLITS = ("train", "val")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
VARIANT_FILE = "variant.json"
BATCH = 128  # data.batch_size of both experiments; drop_last=True in training
SUBSET_SEED = 0


@dataclass(frozen=True)
class Point:
    """One storage setting: how its data is made and how run.py trains on it."""

    name: str
    kind: str                    # tokens | jpeg | resolution | subset
    setting: str                 # what the table calls it: "K=512", "q75", "32 px", "1.9 MB"
    quality: int | None = None   # JPEG quality of the written files (jpeg, resolution)
    size: int | None = None      # stored side in px (resolution)
    codebook_size: int | None = None   # tokens
    budget_of: str | None = None       # subset: the point whose train bytes set the budget
    budget_factor: float = 1.0
    extra: tuple[str, ...] = field(default=())


def all_points() -> dict[str, Point]:
    pts = [Point("tokens_k512", "tokens", "K=512", codebook_size=512),
           Point("tokens_k256", "tokens", "K=256", codebook_size=256),
           Point("tokens_k128", "tokens", "K=128", codebook_size=128)]
    pts += [Point(f"jpeg_q{q}", "jpeg", f"q{q}", quality=q) for q in (95, 75, 50, 25, 10, 5)]
    pts += [Point(f"res{s}", "resolution", f"{s} px", quality=95, size=s) for s in (32, 16)]
    pts += [Point("res16_q50", "resolution", "16 px q50", quality=50, size=16)]
    pts += [Point("subset_tok512", "subset", "= K=512 bytes", budget_of="tokens_k512"),
            Point("subset_tok512x4", "subset", "= 4x K=512 bytes", budget_of="tokens_k512", budget_factor=4.0)]
    return {p.name: p for p in pts}


# The priority list: what a plain run trains, in this order.
DEFAULT_POINTS = ("tokens_k512", "jpeg_q95", "jpeg_q75", "jpeg_q50", "jpeg_q25", "jpeg_q10", "jpeg_q5",
                  "res32", "res16", "subset_tok512")


# ----------------------------------------------------------------------------- data variants


def list_images(root: Path, split: str) -> list[tuple[str, Path]]:
    """(class name, file) of every image of an ImageFolder split, sorted. Raises if the split is missing."""
    d = root / split
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no {split}/ split in the ImageFolder tree {root}")
    out = []
    for cls in sorted(p.name for p in d.iterdir() if p.is_dir()):
        out += [(cls, f) for f in sorted((d / cls).iterdir()) if f.suffix.lower() in IMAGE_EXTS]
    if not out:
        raise FileNotFoundError(f"{d}: no image files in its class folders")
    return out


def encode_jpeg(src: Path, dst: Path, quality: int, size: int | None = None) -> int:
    """Decode ``src`` to RGB, optionally bicubic-resize to size x size, write JPEG at ``quality``
    (Pillow/libjpeg, 4:2:0, optimised Huffman tables) to ``dst``. Returns the bytes written."""
    from PIL import Image

    with Image.open(src) as img:
        img = img.convert("RGB")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        dst.parent.mkdir(parents=True, exist_ok=True)
        img.save(dst, format="JPEG", quality=int(quality), optimize=True)
    return dst.stat().st_size


def split_bytes(root: Path, split: str) -> tuple[int, int]:
    """(number of images, sum of their file sizes in bytes) of one split of an ImageFolder tree."""
    files = list_images(root, split)
    return len(files), sum(f.stat().st_size for _, f in files)


def stratified_subset(files: list[tuple[str, Path]], budget: int, seed: int = SUBSET_SEED) -> list[tuple[str, Path]]:
    """A random subset of ``files`` (class, path) whose sizes add up to at most ``budget`` bytes,
    stratified by class: each class's files are shuffled (seeded), then classes take one file
    each in turn (a shuffled class order) until the next file would pass the budget, so class
    counts differ by at most one. Raises ValueError if not even one file per class fits."""
    rng = random.Random(seed)
    by_class: dict[str, list[Path]] = {}
    for cls, f in files:
        by_class.setdefault(cls, []).append(f)
    for paths in by_class.values():
        rng.shuffle(paths)
    order = sorted(by_class)
    rng.shuffle(order)
    picked: list[tuple[str, Path]] = []
    total, i = 0, 0
    while True:
        progressed = False
        for cls in order:
            if i >= len(by_class[cls]):
                continue
            size = by_class[cls][i].stat().st_size
            if total + size > budget:
                if len(picked) < len(order):
                    raise ValueError(f"a budget of {budget} bytes does not hold one image of each of the "
                                     f"{len(order)} classes")
                return picked
            picked.append((cls, by_class[cls][i]))
            total += size
            progressed = True
        i += 1
        if not progressed:
            return picked  # every file fits


def _finish(tmp: Path, out: Path, record: dict) -> dict:
    (tmp / VARIANT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return record


def build_reencoded(source: Path, out: Path, quality: int, size: int | None = None, *, desc: str = "") -> dict:
    """Re-encode every train and val image of ``source`` (JPEG at ``quality``, optionally at size x size)
    into the ImageFolder tree ``out``; resumable as a whole (``out/variant.json`` = done; a partial
    build in ``out.tmp`` is redone). Returns the variant record (counts and bytes per split)."""
    from tqdm import tqdm

    if (out / VARIANT_FILE).is_file():
        return json.loads((out / VARIANT_FILE).read_text())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    record = {"source": str(source), "quality": quality, "size": size, "codec": "JPEG 4:2:0 optimize=True",
              "splits": {}}
    for split in SPLITS:
        files = list_images(source, split)
        total = 0
        for cls, f in tqdm(files, desc=f"{desc or out.name} {split}", mininterval=5, leave=False):
            total += encode_jpeg(f, tmp / split / cls / (f.stem + ".jpg"), quality, size)
        record["splits"][split] = {"images": len(files), "bytes": total}
    return _finish(tmp, out, record)


def build_subset(source: Path, out: Path, budget: int, seed: int = SUBSET_SEED) -> dict:
    """Copy a class-stratified random subset of ``source``'s train images of at most ``budget`` bytes,
    and all its val images, into the ImageFolder tree ``out`` (files byte-identical). Resumable as
    ``build_reencoded``; a finished subset of another budget or seed is rebuilt."""
    if (out / VARIANT_FILE).is_file():
        record = json.loads((out / VARIANT_FILE).read_text())
        if record.get("budget") == budget and record.get("seed") == seed:
            return record
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    record = {"source": str(source), "budget": budget, "seed": seed, "splits": {}}
    for split in SPLITS:
        files = list_images(source, split)
        if split == "train":
            files = stratified_subset(files, budget, seed)
        for cls, f in files:
            (tmp / split / cls).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, tmp / split / cls / f.name)
        record["splits"][split] = {"images": len(files), "bytes": sum(f.stat().st_size for _, f in files)}
    return _finish(tmp, out, record)


def token_root(k: int) -> Path:
    """The token dataset dir that ``experiment=tiny20_tokens tokenizer.codebook_size=K`` trains on."""
    return TOKENS / f"tiny20_patch_kmeans_s64p4k{k}"


def token_train_bytes(root: Path) -> tuple[int, int, int]:
    """(train samples, bytes a copy of the training set needs, of which the dataset-level files) of a
    token dataset dir: its train shards plus every top-level file (codebook, codec model, synonyms,
    dataset.json), measured on disk. Raises FileNotFoundError if it is not built."""
    info = root / "dataset.json"
    if not info.is_file():
        raise FileNotFoundError(f"{info}: token dataset not built (python run.py task=tokenize "
                                f"experiment=tiny20_tokens tokenizer.codebook_size=K)")
    meta = json.loads(info.read_text())
    shards = [s for s in meta["shards"] if s["split"] == "train"]
    shard_bytes = sum((root / "shards" / s["name"]).stat().st_size for s in shards)
    shared = sum(p.stat().st_size for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    return sum(s["count"] for s in shards), shard_bytes + shared, shared


# ----------------------------------------------------------------------------- runs


def run_dir(point: str, seed: int, tag: str) -> Path:
    return RESULTS / "runs" / tag / f"{point}_s{seed}"


def point_data(p: Point, source: Path, build: bool = True) -> dict:
    """Build (if asked) and measure a point's training data: n_train, train_bytes, shared_bytes, root."""
    if p.kind == "tokens":
        root = token_root(p.codebook_size)
        if build and not (root / "dataset.json").is_file():
            cmd = [sys.executable, "run.py", "task=tokenize", "experiment=tiny20_tokens",
                   f"tokenizer.codebook_size={p.codebook_size}", "print_config=false"]
            print("$", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "SEIT_ROOT": str(OUT)})
        n, total, shared = token_train_bytes(root)
        return {"root": str(root), "n_train": n, "train_bytes": total, "shared_bytes": shared}
    root = DATA / p.name
    if p.kind in ("jpeg", "resolution"):
        if build:
            build_reencoded(source, root, p.quality, p.size)
    elif p.kind == "subset":
        budget_point = all_points()[p.budget_of]
        budget = int(point_data(budget_point, source, build)["train_bytes"] * p.budget_factor)
        if build:
            build_subset(source, root, budget)
    else:
        raise ValueError(f"point {p.name}: unknown kind {p.kind!r}")
    n, total = split_bytes(root, "train")
    return {"root": str(root), "n_train": n, "train_bytes": total, "shared_bytes": 0}


def overrides(p: Point, data: dict, seed: int, epochs: int, lr: float, tag: str, full_train: int) -> list[str]:
    """The run.py overrides of one (point, seed)."""
    if p.kind == "tokens":
        cmd = ["experiment=tiny20_tokens", f"tokenizer.codebook_size={p.codebook_size}"]
    else:
        cmd = ["experiment=tiny20_pixels", f"data.source={data['root']}"]
    cmd += [f"optim.lr={lr}", f"seed={seed}"]
    if p.kind == "subset":  # the same optimizer steps as the full set: more epochs, the same warmup steps
        steps = epochs * (full_train // BATCH)
        per_epoch = data["n_train"] // BATCH
        if per_epoch < 1:
            raise ValueError(f"point {p.name}: {data['n_train']} training images is less than one batch of {BATCH}")
        sub_epochs = math.ceil(steps / per_epoch)
        cmd += [f"trainer.max_epochs={sub_epochs}", f"scheduler.warmup_fraction={1 / epochs:.6f}",
                f"trainer.check_val_every_n_epoch={sub_epochs}"]
    else:
        cmd += [f"trainer.max_epochs={epochs}"]
    return [*cmd, *p.extra, f"hydra.run.dir={run_dir(p.name, seed, tag)}", "print_config=false"]


def launch(cmd: list[str], log: Path) -> int:
    print("$ OMP_NUM_THREADS=1 python " + " ".join(cmd[1:]), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SEIT_ROOT": str(OUT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    start = time.time()
    with open(log, "a") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    print(f"{'done' if rc == 0 else f'FAILED (rc {rc})'} in {time.time() - start:.0f}s: {log}", flush=True)
    return rc


# ----------------------------------------------------------------------------- report


def collect(names: list[str], seeds: list[int], tag: str, source: Path) -> list[dict]:
    points = all_points()
    rows = []
    for name in names:
        p = points[name]
        try:
            data = point_data(p, source, build=False)
        except FileNotFoundError:
            continue
        accs, top5, steps, walls = {}, {}, [], []
        for seed in seeds:
            f = run_dir(name, seed, tag) / "summary.json"
            if f.is_file():
                s = json.loads(f.read_text())
                accs[seed] = 100 * s["metrics"]["val/acc1"]
                top5[seed] = 100 * s["metrics"].get("val/acc5", float("nan"))
                steps.append(s["global_step"])
                walls.append(s["wall_s"])
        if not accs:
            continue
        vals = list(accs.values())
        rows.append({"point": name, "kind": p.kind, "setting": p.setting, "n_train": data["n_train"],
                     "train_bytes": data["train_bytes"], "shared_bytes": data["shared_bytes"],
                     "bytes_per_image": data["train_bytes"] / data["n_train"],
                     "total_mb": data["train_bytes"] / 1e6, "seeds": ",".join(map(str, accs)),
                     "acc1": " / ".join(f"{a:.1f}" for a in vals), "acc1_mean": statistics.mean(vals),
                     "acc1_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                     "acc1_min": min(vals), "acc1_max": max(vals),
                     "acc5_mean": statistics.mean(top5.values()), "steps": max(steps),
                     "wall_s_mean": statistics.mean(walls)})
    return rows


def markdown(rows: list[dict]) -> str:
    """The frontier table, sorted by the training set's bytes."""
    lines = ["| point | storage | train images | bytes / image | train MB | seeds | top-1 per seed | top-1 mean ± std "
             "| top-5 mean | steps |", "|---|---|---:|---:|---:|---|---|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["train_bytes"]):
        lines.append(f"| {r['point']} | {r['kind']} {r['setting']} | {r['n_train']:,} | {r['bytes_per_image']:,.0f} "
                     f"| {r['total_mb']:.2f} | {r['seeds']} | {r['acc1']} "
                     f"| {r['acc1_mean']:.1f} ± {r['acc1_std']:.1f} | {r['acc5_mean']:.1f} | {r['steps']} |")
    return "\n".join(lines) + "\n"


KIND_STYLE = {"tokens": ("tab:red", "*"), "jpeg": ("tab:blue", "o"), "resolution": ("tab:green", "s"),
              "subset": ("tab:purple", "D")}


def plot(rows: list[dict], path: Path, title: str, full_train: int) -> None:
    """Val top-1 against the training set's bytes on disk (log x, MB; the top axis divides by the
    full set's ``full_train`` images, = bytes per image for every full-data point and the budget
    per original image for a subset); one colour and marker per storage kind, error bars =
    min..max over seeds, the JPEG qualities joined in byte order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    for kind, (colour, marker) in KIND_STYLE.items():
        rs = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["train_bytes"])
        if not rs:
            continue
        x = [r["total_mb"] for r in rs]
        y = [r["acc1_mean"] for r in rs]
        err = [[r["acc1_mean"] - r["acc1_min"] for r in rs], [r["acc1_max"] - r["acc1_mean"] for r in rs]]
        ax.errorbar(x, y, yerr=err, color=colour, marker=marker, markersize=10 if marker == "*" else 6,
                    linestyle="-" if kind == "jpeg" else "none", capsize=3, label=kind)
        for r in rs:
            ax.annotate(r["setting"], (r["total_mb"], r["acc1_mean"]), textcoords="offset points",
                        xytext=(4, 5), fontsize=7, color=colour)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("training set on disk (MB, log)")
    ax.set_ylabel("val top-1 (%)")
    top = ax.secondary_xaxis("top", functions=(lambda mb: mb * 1e6 / full_train, lambda b: b * full_train / 1e6))
    top.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    top.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    top.set_xlabel(f"bytes per image of the full {full_train:,}-image training set")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.08, y=0.12)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def report(names: list[str], seeds: list[int], tag: str, source: Path, epochs: int, lr: float) -> list[dict]:
    import csv

    rows = collect(names, seeds, tag, source)
    if not rows:
        print(f"no finished runs under {RESULTS / 'runs' / tag}")
        return rows
    RESULTS.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    with open(RESULTS / "frontier.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in sorted(rows, key=lambda r: r["train_bytes"]):
            w.writerow({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
    table = markdown(rows)
    if partial := [f"{r['point']} (seeds {r['seeds']})" for r in rows if len(r["seeds"].split(",")) < len(seeds)]:
        print(f"PARTIAL: fewer than {len(seeds)} seeds finished for: {', '.join(partial)}")
    (RESULTS / "frontier.md").write_text(table)
    plot(rows, RESULTS / "frontier.png", f"tiny-imagenet-20, micro ViT, {epochs} epochs (subsets: the same steps), "
         f"lr {lr}\nerror bars: min..max over the seeds in frontier.md", split_bytes(source, "train")[0])
    print(table)
    print(f"wrote {RESULTS / 'frontier.csv'}, {RESULTS / 'frontier.md'}, {RESULTS / 'frontier.png'}")
    return rows


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", default=",".join(DEFAULT_POINTS),
                        help=f"comma-separated, or 'all'; known: {', '.join(all_points())}")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--epochs", type=int, default=3, help="trainer.max_epochs of every full-data point")
    parser.add_argument("--lr", type=float, default=1e-3, help="optim.lr of every point")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each one torch thread)")
    parser.add_argument("--tag", default=None, help="run dir group under runs/ (default e<epochs>)")
    parser.add_argument("--source", type=Path, default=SOURCE, help="the tiny-imagenet-20 ImageFolder (train/, val/)")
    parser.add_argument("--report", action="store_true", help="only write the table and plot from finished runs")
    parser.add_argument("--dry-run", action="store_true", help="build and measure the data, print the commands")
    args = parser.parse_args()
    known = all_points()
    names = list(known) if args.points == "all" else [n.strip() for n in args.points.split(",") if n.strip()]
    if unknown := [n for n in names if n not in known]:
        parser.error(f"unknown point {unknown[0]!r}; known: {', '.join(known)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    tag = args.tag or f"e{args.epochs}"
    if args.report:
        report(names, seeds, tag, args.source, args.epochs, args.lr)
        return

    full_train = split_bytes(args.source, "train")[0]
    jobs = []
    for name in names:  # build and measure every point's data first (sequentially: tokenize is not parallel-safe)
        data = point_data(known[name], args.source)
        print(f"{name}: {data['n_train']} train images, {data['train_bytes']:,} B = "
              f"{data['train_bytes'] / data['n_train']:,.1f} B/image  ({data['root']})", flush=True)
        for seed in seeds:
            jobs.append((seed, name, overrides(known[name], data, seed, args.epochs, args.lr, tag, full_train)))
    jobs.sort(key=lambda j: j[0])  # every point's first seed before any second seed
    todo = [j for j in jobs if not (run_dir(j[1], j[0], tag) / "summary.json").is_file()]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already finished", flush=True)
    if args.dry_run:
        for seed, name, ov in todo:
            print("$ OMP_NUM_THREADS=1 python run.py " + " ".join(ov))
        return
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rcs = list(pool.map(lambda j: launch([sys.executable, "run.py", *j[2]],
                                             run_dir(j[1], j[0], tag).with_suffix(".log")), todo))
    report(names, seeds, tag, args.source, args.epochs, args.lr)
    if any(rcs):
        sys.exit(f"{sum(1 for r in rcs if r)} run(s) failed; their logs are beside the run dirs")


if __name__ == "__main__":
    main()
