"""The one-GPU suite (issue #20): throughput, MFU, tokenize, loader and the long schedules in one
timed run that writes ``gpu_suite.json`` and ``gpu_suite.md`` (copy the tables into RESULTS.md
with the GPU's name and the date).

    python experiments/gpu_suite.py --pack data_cache/gpu_suite           # once, here: gather what --data reads
    python experiments/gpu_suite.py --data data_cache/gpu_suite --out OUT # on the GPU machine, <= 8 min
    python experiments/gpu_suite.py --smoke                               # the same code paths on CPU (CI)

Stages 1-3 run one after another, each in a child process with a time budget (40%, 17% and 8% of
``--budget``); the three long-schedule stages then run side by side in all the time left. A child
past its budget is killed with its process group; the JSON and Markdown are written in any case,
and every stage that did not finish says why. ``--budget`` (default 480 s) includes setup.

1. ``throughput``: train img/s (forward, cross-entropy, backward, fused AdamW; bf16 autocast,
   ``torch.compile``, batch 256) of the token ViT-B (seit ``TokenViT``, 768 wide, 12 deep, SeiT's
   geometry: 28x28 ids of a K=8192, D=32 codebook through the k4 s2 Stem-Adaptor -> 14x14 grid)
   against timm's ``vit_base_patch16_224`` (the same width and depth, 14x14 patches of 224 px): from
   pre-decoded uint8 tensors on the device, and from JPEG through the real loader
   (``ImageFolderDataModule``, squash-resize to 224, one worker per CPU core; ImageNet-size JPEGs
   when ``imagenet-samples-200`` is there, else the 64 px tiny-imagenet-20 ones). FLOPs of one
   forward + backward from ``torch.utils.flop_counter.FlopCounterMode`` (attention in SDPA's math
   backend, so it is counted); MFU = achieved FLOP/s over the dense bf16 peak (``PEAK_TFLOPS`` by
   ``torch.cuda.get_device_name()``, or ``--peak-tflops``); null on a CPU.
2. ``tokenize``: ``seit.pipelines.tokenize.tokenize`` with a VQGAN-f16-sized encoder (taming's
   ImageNet f16 layout, random weights saved as a bare state dict) on ``--tokenize-images``
   tiny-imagenet-20 JPEGs (resized to 256 px) on the GPU, after a warm-up build, against the CPU
   path on 1 + ``--cpu-tokenize-images`` images in one worker, i.e. one core (about 3 s per image;
   all cores estimated as that x cores). End to end
   (decode, encode, codec, shards), and per image: the difference of a small and a big build,
   which leaves out the fixed costs (checkpoint conversion, codec fit) that dominate a few images.
3. ``loader``: samples/s of the token loader (``TokenDataModule``, 2 workers, batch 256, host to
   device copy included) on each token dataset present, against the token ViT-B's train img/s of 1;
   the verdict comes from the 32x32 dataset (the grid the ViT-B's 28x28 crops come from).
4. ``long_mtm``, ``long_ablation``, ``long_continual``: run.py runs (``trainer=gpu``, ``--jobs`` at
   a time in each stage): MTM pre-train 200 epochs + fine-tune 50 against scratch 250
   (``mtm_tiny20.py``'s rows, 2 seeds); the augmentation ablation at 100 epochs
   (``ablation_tiny20.py --tag long --extra trainer.max_epochs=100 optim.lr=1e-3``, 2 seeds; the
   TokenAdapt row only with ``--tokenadapt``); class-incremental at 3x the epochs per task (15), 100 KB
   memory, ER, tokens and pixels (``continual_tiny20.py``'s protocol, 2 seeds). Runs still going at
   the end get SIGTERM (run.py saves last.ckpt) and are listed with the epochs they validated; a
   later suite run with the same ``--work`` resumes them and keeps the finished ones.
   ``--curation``: before them, ``bench_curation.py --device cuda --points N --json`` (k-means,
   SemDeDup and retrieval on the GPU; needs faiss, which the wheels above do not hold).

What ``--data DIR`` holds (``--pack DIR`` copies it from this checkout: 43 MiB):

    DIR/tiny-imagenet-20/            JPEGs (train/, val/): the pixel rows, the tokenize source      21 MB
    DIR/imagenet-samples-200/        optional: ImageNet-size JPEGs for the JPEG leg of 1            22 MB
    DIR/tokens/tiny20_patch_kmeans_s64p4k512 (+ .tokenizer.safetensors): 16x16 ids, stages 3, 4    2.2 MB
    DIR/tokens/in200_patch_kmeans_s256p8k512 (+ .tokenizer.safetensors): 32x32 ids for stage 3    0.2 MB
        (build it first: python run.py task=tokenize experiment=in200_storage)

Without ``--data`` it reads ``../shared/data`` and ``data_cache/tokens`` of this checkout; a machine
without ../shared gets DIR carried in a git-ignored folder (``data_cache/gpu_suite``). Put ``--work``
(run dirs, checkpoints, the ~290 MB VQGAN files) outside ``--out`` when OUT is copied back.
It needs what the README installs. A machine that has torch, timm, pytorch-lightning and numba but
not the rest needs the wheels it names at start: hydra-core, omegaconf, antlr4-python3-runtime,
webdataset, braceexpand, zstandard (``pip install --no-deps --target /tmp/site .whl/*.whl`` and
``PYTHONPATH=/tmp/site``); a stage whose imports are missing is skipped with the wheel's name.
``--smoke`` makes its own small data (20 classes of synthetic JPEGs, a k-means token dataset, a
small VQGAN), runs every stage on the CPU at toy sizes with one run per long schedule, and ends
within its budget (150 s). It costs about 130 CPU-seconds: 135 s of wall on a 2-core machine that
others loaded to 4, about a minute on an idle one.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "experiments"))

# Dense bf16 peak TFLOP/s (no sparsity), by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_TFLOPS = {
    "H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "GH200": 989.0,
    "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
    "A10G": 70.0, "A10": 125.0, "RTX 6000 Ada": 364.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0,
}
# Module -> the distribution that provides it (versions come from constraints.txt).
DISTRIBUTIONS = {
    "hydra": "hydra-core", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime", "webdataset": "webdataset",
    "braceexpand": "braceexpand", "pytorch_lightning": "pytorch-lightning", "lightning_utilities": "lightning-utilities",
    "timm": "timm", "torchmetrics": "torchmetrics", "numba": "numba", "llvmlite": "llvmlite",
    "zstandard": "zstandard", "safetensors": "safetensors", "tqdm": "tqdm", "PIL": "pillow", "yaml": "PyYAML",
    "matplotlib": "matplotlib", "scipy": "scipy", "torchvision": "torchvision",
}
STAGES = ("throughput", "tokenize", "loader", "long_mtm", "long_ablation", "long_continual")
# Share of the budget each of stages 1-3 may take at most (what they leave goes to the long schedules);
# --smoke gives them fixed seconds instead (a child's start-up is most of a toy stage).
SHARES = {"throughput": 0.40, "tokenize": 0.17, "loader": 0.08}
SMOKE_SECONDS = {"throughput": 30.0, "tokenize": 20.0, "loader": 18.0}
SETUP_S = 15.0  # what the parent keeps for itself: preflight, writing the report
TINY20 = "tiny20_patch_kmeans_s64p4k512"
IN200 = "in200_patch_kmeans_s256p8k512"


# --- environment ------------------------------------------------------------------------------
def pinned_versions() -> dict[str, str]:
    """{distribution (lower case): version} from constraints.txt."""
    out = {}
    path = ROOT / "constraints.txt"
    if path.is_file():
        for line in path.read_text().splitlines():
            name, _, rest = line.partition("==")
            if rest:
                out[name.strip().lower()] = rest.split(",")[0].strip()
    return out


def wheel_name(module: str) -> str:
    dist = DISTRIBUTIONS.get(module, module)
    version = pinned_versions().get(dist.lower())
    return f"{dist}=={version}" if version else dist


def missing_modules() -> list[str]:
    return [m for m in DISTRIBUTIONS if importlib.util.find_spec(m) is None]


def needs(*modules: str) -> None:
    """Import ``modules`` (dotted seit modules too); a missing one raises MissingWheel naming the wheel."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            top = (exc.name or name).split(".")[0]
            raise MissingWheel(f"missing module {top!r} (install the wheel {wheel_name(top)})") from None


class MissingWheel(RuntimeError):
    pass


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


# --- data -------------------------------------------------------------------------------------
@dataclass
class Data:
    """Where the suite reads: ``images/<name>`` JPEG folders and ``tokens/<name>`` token datasets."""

    images: Path
    tokens: Path

    @classmethod
    def at(cls, root: str | None) -> "Data":
        if root is None:
            return cls(ROOT.parent / "shared" / "data", ROOT / "data_cache" / "tokens")
        root = Path(root).resolve()
        if not root.is_dir():
            raise SystemExit(f"--data {root}: no such folder (make it with --pack {root})")
        return cls(root, root / "tokens")

    def image_dir(self, name: str) -> Path | None:
        path = self.images / name
        return path if path.is_dir() else None

    def token_dir(self, name: str) -> Path | None:
        path = self.tokens / name
        return path if (path / "dataset.json").is_file() else None


def pack(dest: Path) -> None:
    """Copy the folders ``--data`` reads from this checkout into ``dest``; print the total size."""
    src = Data.at(None)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("tiny-imagenet-20", "imagenet-samples-200"):
        if (src.images / name).is_dir() and not (dest / name).exists():
            shutil.copytree(src.images / name, dest / name)
    (dest / "tokens").mkdir(exist_ok=True)
    for name in (TINY20, IN200):
        for part in (name, f"{name}.tokenizer.safetensors"):
            p = src.tokens / part
            if p.is_dir() and not (dest / "tokens" / part).exists():
                shutil.copytree(p, dest / "tokens" / part)
            elif p.is_file():
                shutil.copy2(p, dest / "tokens" / part)
        if not (src.tokens / name).is_dir():
            print(f"note: {src.tokens / name} is missing; build it first "
                  f"({'python run.py task=tokenize experiment=tiny20_tokens' if name == TINY20 else 'python run.py task=tokenize experiment=in200_storage'})")
    total = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{dest}: {total / 2**20:.1f} MiB in {sum(1 for _ in dest.rglob('*'))} entries")


def make_smoke_data(root: Path) -> Data:
    """Synthetic stand-ins, made once: a 20-class 64 px JPEG folder and a k-means token dataset of it."""
    import numpy as np
    from PIL import Image

    images = root / "tiny-imagenet-20"
    if not images.is_dir():
        rng = np.random.default_rng(0)
        for split, n in (("train", 6), ("val", 2)):
            for c in range(20):  # 20 classes: the continual protocol's 5 tasks of 4
                d = images / split / f"n{c:08d}"
                d.mkdir(parents=True, exist_ok=True)
                base = np.array([(c * 97) % 256, (c * 53 + 40) % 256, (c * 31 + 90) % 256])
                for i in range(n):
                    img = np.clip(base + rng.normal(0, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
                    Image.fromarray(img).save(d / f"{split}_{c}_{i}.JPEG", quality=90)
    data = Data(root, root / "tokens")
    if data.token_dir(TINY20) is None:
        needs("omegaconf", "seit.pipelines.tokenize")
        from omegaconf import OmegaConf

        from seit.pipelines.tokenize import tokenize

        tokenize(OmegaConf.create({
            "paths": {"cache_dir": str(root / "cache")},
            "tokenizer": {"kind": "patch_kmeans", "checkpoint": None, "image_size": 64, "patch_size": 4,
                          "codebook_size": 512, "codebook_dim": 32, "fit_images": 48, "fit_patches": 4000,
                          "fit_iters": 3, "seed": 0, "compact": False, "device": "cpu", "precision": "auto"},
            "data": {"root": str(data.tokens / TINY20), "build": {
                "source": str(images), "shard_size": 16, "chunk_size": 8, "codec": "ctx-rans", "codec_fit_samples": 32,
                "shuffle_seed": 0, "workers": 0, "skip_bad_images": False, "synonyms_k": 5, "storage_report": False,
                "storage_report_samples": 16, "parity": 0.0, "rank_stall_s": 60}}}), rank=0, world=1)
    return data


# --- stage results ----------------------------------------------------------------------------
class Stage:
    """A stage's result dict, written to ``path`` after every change (a killed stage keeps what it had)."""

    def __init__(self, path: Path, name: str, budget_s: float):
        self.path, self.start = path, time.monotonic()
        self.deadline = self.start + budget_s
        self.data: dict = {"stage": name, "status": "running", "reason": None, "budget_s": round(budget_s, 1)}
        self.save()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def set(self, **kw) -> None:
        self.data.update(kw)
        self.save()

    def save(self) -> None:
        self.data["wall_s"] = round(time.monotonic() - self.start, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.path)


# --- 1. throughput ----------------------------------------------------------------------------
@dataclass
class Geometry:
    width: int
    depth: int
    heads: int
    batch: int
    token_crop: int      # ids per side fed to the token ViT (its 14x14 grid after the k4 s2 stem)
    token_grid: int      # ids per side of the token dataset the loader reads (the crop's source)
    codebook: tuple[int, int]
    image: int           # pixels per side fed to the pixel ViT
    patch: int
    flop_batch: int


FULL = Geometry(768, 12, 12, 256, 28, 32, (8192, 32), 224, 16, 8)
SMOKE = Geometry(64, 2, 2, 8, 8, 16, (64, 8), 64, 16, 2)


def build_models(g: Geometry):
    import timm
    import torch

    from seit.models.vit import TokenViT

    torch.manual_seed(0)
    token = TokenViT(input="tokens", input_size=g.token_crop, num_classes=1000, embed_dim=g.width, depth=g.depth,
                     num_heads=g.heads, drop_path_rate=0.1, codebook_size=g.codebook[0], codebook_dim=g.codebook[1])
    pixel = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=1000, img_size=g.image,
                              patch_size=g.patch, embed_dim=g.width, depth=g.depth, num_heads=g.heads,
                              drop_path_rate=0.1)
    return token, pixel


class Trainer:
    """One model's train step: uint8/uint16 input -> (embed | normalise) -> model -> CE -> backward -> AdamW."""

    def __init__(self, kind: str, model, device, compile_backend: str | None):
        import torch

        self.kind, self.device = kind, device
        self.model = model.to(device).train()
        fused = device.type == "cuda"
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.05, fused=fused)
        self.net = torch.compile(self.model, backend=compile_backend) if compile_backend else self.model
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        self.mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255

    def forward(self, net, x):
        if self.kind == "tokens":
            return net(self.model.embed(x))  # the codebook lookup, then the compiled body
        return net((x.float() - self.mean) / self.std)

    def loss(self, net, x, y):
        import torch.nn.functional as F

        with self.autocast:
            return F.cross_entropy(self.forward(net, x), y)

    def step(self, x, y) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss(self.net, x, y).backward()
        self.opt.step()

    def flops_per_image(self, x, y) -> float:
        """FLOPs of one forward + backward (eager, the uncompiled module), per image. Attention runs
        in SDPA's math backend here so that its matmuls are counted on every device (the fused CPU
        kernel has no FLOP formula; CUDA's flash / efficient kernels count the same as the math)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter, sdpa_kernel(SDPBackend.MATH):
            self.loss(self.model, x, y).backward()
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops() / x.shape[0]


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(trainer: Trainer, batches, warmup: int, window_s: float, max_steps: int) -> dict:
    """Run ``warmup`` steps, then steps for ``window_s`` seconds (at most ``max_steps``); img/s."""
    it = iter(batches)
    t0 = time.perf_counter()
    for _ in range(warmup):
        x, y = next(it)
        trainer.step(x, y)
    sync(trainer.device)
    warm_s = time.perf_counter() - t0
    n = images = 0
    start = time.perf_counter()
    while n < max_steps and (n < 2 or time.perf_counter() - start < window_s):
        x, y = next(it)
        trainer.step(x, y)
        n, images = n + 1, images + x.shape[0]
        if n % 5 == 0:
            sync(trainer.device)
    sync(trainer.device)
    secs = time.perf_counter() - start
    return {"img_per_s": round(images / secs, 1), "step_ms": round(1000 * secs / n, 2), "steps": n,
            "warmup_s": round(warm_s, 1)}


def synthetic_batches(kind: str, g: Geometry, device):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    if kind == "tokens":
        x = torch.randint(0, g.codebook[0], (g.batch, g.token_crop, g.token_crop), generator=gen).to(torch.int32)
    else:
        x = torch.randint(0, 256, (g.batch, 3, g.image, g.image), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 1000, (g.batch,), generator=gen)
    x, y = x.to(device), y.to(device)
    while True:
        yield x, y


def jpeg_batches(loader, device):
    import torch

    while True:
        for batch in loader:
            x = batch["images"].to(device, non_blocking=True)
            y = torch.randint(0, 1000, (x.shape[0],)).to(device, non_blocking=True)
            yield x, y


def jpeg_loader(data: Data, g: Geometry, workers: int, pin: bool, min_images: int):
    """The real pixel loader (``ImageFolderDataModule``) over ImageNet-size JPEGs when present, else tiny20."""
    from omegaconf import OmegaConf

    from seit.data.image_datamodule import ImageFolderDataModule

    name = "imagenet-samples-200" if data.image_dir("imagenet-samples-200") else "tiny-imagenet-20"
    source = data.image_dir(name)
    if source is None:
        raise FileNotFoundError(f"no JPEG folder under {data.images} (tiny-imagenet-20 or imagenet-samples-200)")
    cfg = OmegaConf.create({"kind": "images", "source": str(source), "image_size": g.image, "train_split": "train",
                            "val_split": "val", "batch_size": g.batch, "eval_batch_size": g.batch,
                            "num_workers": workers, "pin_memory": pin, "fixed_batches": None})
    dm = ImageFolderDataModule(cfg, cache_dir=str(data.images / ".cache"))
    dm.setup()
    records = dm.splits["train"]
    dm.splits["train"] = records * max(1, -(-min_images // len(records)))  # a small folder, repeated
    import statistics

    sizes = [os.path.getsize(r.path) for r in records[:200] if r.offset < 0]
    return dm.train_dataloader(), {"source": name, "images": len(records), "workers": workers,
                                   "mean_jpeg_bytes": round(statistics.mean(sizes)) if sizes else None}


def stage_throughput(st: Stage, args, data: Data) -> None:
    needs("torch", "timm", "seit.models.vit")
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = SMOKE if args.smoke else FULL
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = peak_tflops(name, args.peak_tflops) if device.type == "cuda" else None
    backend = "eager" if device.type != "cuda" else "inductor"  # CPU: the same dynamo path, no C++ build
    st.set(device=name, peak_bf16_tflops=peak, batch=g.batch, precision="bf16-autocast" if device.type == "cuda" else "fp32",
           compile_backend=backend, rows={},
           geometry={"width": g.width, "depth": g.depth, "heads": g.heads, "token_ids": f"{g.token_crop}x{g.token_crop}",
                     "codebook": list(g.codebook), "pixels": f"{g.image}x{g.image}/{g.patch}"})
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    token, pixel = build_models(g)
    window = 1.5 if args.smoke else 8.0
    plan = [("token ViT-B", "tokens", token, "synthetic ids on the device"),
            ("timm ViT-B/16", "pixels", pixel, "pre-decoded uint8 on the device"),
            ("timm ViT-B/16", "pixels_jpeg", pixel, None)]
    trainers = {}
    for label, key, model, feed in plan:
        need = 15 if key == "pixels_jpeg" else 45  # the JPEG leg reuses the compiled pixel model
        if st.left() < (4 if args.smoke else need):
            st.data["rows"][key] = {"status": "skipped", "reason": f"no time left in the stage ({st.left():.0f} s)"}
            st.save()
            continue
        try:
            kind = "tokens" if key == "tokens" else "pixels"
            if kind not in trainers:
                trainers[kind] = Trainer(kind, model, device, backend)
            tr = trainers[kind]
            row = {"model": label, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}
            if key == "pixels_jpeg":
                needs("omegaconf", "pytorch_lightning", "seit.data.image_datamodule")
                workers = cpu_count() if not args.smoke else 1
                loader, info = jpeg_loader(data, g, workers, device.type == "cuda",
                                           g.batch * (200 if not args.smoke else 4))
                row.update(feed=f"JPEG -> ImageFolderDataModule ({info['source']}, {workers} workers)", **info)
                result = timed_steps(tr, jpeg_batches(loader, device), 3, window, 200)
                row["flops_per_img"] = st.data["rows"].get("pixels", {}).get("flops_per_img")
            else:
                row["feed"] = feed
                batches = synthetic_batches(kind, g, device)
                x, y = next(batches)
                fb = min(g.flop_batch, g.batch)
                row["flops_per_img"] = tr.flops_per_image(x[:fb], y[:fb])
                result = timed_steps(tr, batches, 3, window, 400)
            row.update(result)
            if device.type == "cuda":
                row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
            achieved = row["flops_per_img"] * row["img_per_s"] if row.get("flops_per_img") else None
            row["achieved_tflops"] = round(achieved / 1e12, 2) if achieved else None
            row["mfu"] = round(achieved / (peak * 1e12), 4) if achieved and peak else None
            row["status"] = "ok"
        except MissingWheel as exc:
            row = {"model": label, "status": "skipped", "reason": str(exc)}
        except Exception as exc:  # one row failing (a JPEG folder missing, OOM) leaves the others
            row = {"model": label, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:400]}
        st.data["rows"][key] = row
        st.save()
    rows = st.data["rows"]
    if rows.get("tokens", {}).get("img_per_s") and rows.get("pixels", {}).get("img_per_s"):
        st.data["token_over_pixel"] = round(rows["tokens"]["img_per_s"] / rows["pixels"]["img_per_s"], 2)
    done = [r for r in rows.values() if r.get("status") == "ok"]
    st.set(status="ok" if len(done) == len(plan) else ("partial" if done else "skipped"),
           reason=None if len(done) == len(plan) else "; ".join(f"{k}: {r.get('reason')}" for k, r in rows.items()
                                                               if r.get("status") != "ok"))


# --- 2. tokenize ------------------------------------------------------------------------------
VQGAN_SMOKE = {"ch": 32, "ch_mult": [1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "z_channels": 32,
               "resolution": 64, "image_size": 64, "n_embed": 64, "codebook_dim": 8, "batch_size": 8}


def vqgan_checkpoint(path: Path, overrides: dict) -> Path:
    """A random-init taming VQGAN (conf/tokenizer/taming_vqgan.yaml + ``overrides``) as a bare state dict."""
    import torch
    from omegaconf import OmegaConf

    from seit.tokenizers.taming_vqgan import TamingVQGAN

    if not path.is_file():
        cfg = {**OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "tokenizer" / "taming_vqgan.yaml")), **overrides}
        cfg.pop("patch_size"), cfg.pop("codebook_size")  # interpolations, not architecture
        torch.manual_seed(0)
        torch.save(TamingVQGAN(cfg).state_dict(), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return path


def image_subset(source: Path, dest: Path, n: int, offset: int = 0) -> Path:
    """An ImageFolder of ``n`` symlinked images of ``source``'s train split (classes round-robin)."""
    if dest.is_dir():
        return dest
    classes = sorted(p for p in (source / "train").iterdir() if p.is_dir())
    files = [sorted(c.iterdir()) for c in classes]
    picked, i = 0, offset
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    while picked < n:
        c = i % len(classes)
        k = i // len(classes)
        if k >= max(map(len, files)):
            break
        if k < len(files[c]):
            out = tmp / "train" / classes[c].name
            out.mkdir(parents=True, exist_ok=True)
            (out / files[c][k].name).symlink_to(files[c][k].resolve())
            picked += 1
        i += 1
    tmp.replace(dest)
    return dest


def tokenize_config(ckpt: Path, source: Path, root: Path, device: str, workers: int, extra: dict, fit: int):
    from hydra import compose, initialize_config_dir

    from seit.utils.config import register_resolvers

    register_resolvers()
    over = ["~experiment", "task=tokenize", "data=tiny_imagenet_20", "tokenizer=taming_vqgan",
            f"tokenizer.checkpoint={ckpt}", f"tokenizer.device={device}", "tokenizer.precision=auto",
            f"data.root={root}", f"data.build.source={source}", f"data.build.workers={workers}",
            "data.build.storage_report=false", f"data.build.codec_fit_samples={fit}", "data.build.shard_size=1024",
            f"paths.cache_dir={root.parent / 'cache'}", *[f"tokenizer.{k}={v}" for k, v in extra.items()]]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=over)


def timed_tokenize(cfg) -> float:
    """Seconds of one fresh ``tokenize(cfg)`` build; the build (and its converted tokenizer, ~290 MB
    for the f16 VQGAN) is removed after."""
    from seit.pipelines.tokenize import tokenize

    root, converted = Path(cfg.data.root), Path(f"{cfg.data.root}.tokenizer.safetensors")
    shutil.rmtree(root, ignore_errors=True)
    converted.unlink(missing_ok=True)
    t0 = time.perf_counter()
    meta = tokenize(cfg, rank=0, world=1)
    secs = time.perf_counter() - t0
    if meta.get("num_samples", 0) <= 0:
        raise RuntimeError(f"tokenize wrote no sample to {root}")
    shutil.rmtree(root, ignore_errors=True)
    converted.unlink(missing_ok=True)
    return secs


def stage_tokenize(st: Stage, args, data: Data, work: Path) -> None:
    needs("torch", "omegaconf", "hydra", "seit.pipelines.tokenize", "seit.tokenizers.taming_vqgan")
    import torch

    source = data.image_dir("tiny-imagenet-20")
    if source is None:
        raise FileNotFoundError(f"{data.images / 'tiny-imagenet-20'}: no JPEG folder to tokenize")
    extra = {k: v for k, v in VQGAN_SMOKE.items()} if args.smoke else {}
    ckpt = vqgan_checkpoint(work / ("vqgan_smoke.pt" if args.smoke else "vqgan_f16_random.pt"), extra)
    extra = {k: (json.dumps(v) if isinstance(v, list) else v) for k, v in extra.items()}
    cuda = torch.cuda.is_available()
    cpus = cpu_count()
    st.set(encoder="taming VQGAN f16 layout (ch 128, ch_mult 1,1,2,2,4, 256 px -> 16x16, K=1024), random weights"
           if not args.smoke else "small VQGAN (ch 32, f4, 64 px -> 16x16, K=64), random weights",
           source="tiny-imagenet-20 train JPEGs (64 px, resized up)",
           codec="ctx-rans, its model fitted on the small build's images in both builds", rows={})
    # Two builds per path, small then big: their difference is the per-image rate without the fixed
    # costs (checkpoint conversion, codec fit, synonyms), which a few CPU images would be all about.
    # Both fit the ctx-rans model on the first `small` images (encoded once more for it), so the
    # difference holds each extra image encoded once.
    plan = []
    if cuda:
        plan.append(("gpu", "cuda", min(64, args.tokenize_images // 2), args.tokenize_images, cpus))
    else:
        st.data["rows"]["gpu"] = {"status": "skipped", "reason": "no CUDA device"}
    # The CPU path with one worker: it decodes and encodes with one thread (the pipeline's CPU mode,
    # one encoding worker per core), so the rate is per core; all cores are estimated as rate x cores
    # (a few images make one ENCODE_BATCH, which only one worker would encode anyway).
    plan.append(("cpu", "cpu", 1, 1 + args.cpu_tokenize_images, 1))
    for key, device, small, big, workers in plan:
        if st.left() < (5 if args.smoke else 20):
            st.data["rows"][key] = {"status": "skipped", "reason": f"no time left in the stage ({st.left():.0f} s)"}
            continue
        try:
            if device == "cuda":  # warm-up build on other images: CUDA context, cuDNN autotuning
                warm = image_subset(source, work / f"tok_src_warm{small}", small, offset=big)
                timed_tokenize(tokenize_config(ckpt, warm, work / "tok_warm", device, workers, extra, small))
            threads = 1 if device == "cpu" and workers > 0 else torch.get_num_threads()  # workers run 1 thread
            t_small = timed_tokenize(tokenize_config(ckpt, image_subset(source, work / f"tok_src_{small}", small),
                                                     work / f"tok_{key}_small", device, workers, extra, small))
            if st.left() < (3 if args.smoke else 10):
                raise TimeoutError(f"no time left for the {big}-image build")
            t_big = timed_tokenize(tokenize_config(ckpt, image_subset(source, work / f"tok_src_{big}", big),
                                                   work / f"tok_{key}", device, workers, extra, small))
            marginal = (big - small) / (t_big - t_small) if t_big > t_small else None
            st.data["rows"][key] = {
                "status": "ok", "device": device, "images": big, "decode_workers": workers, "torch_threads": threads,
                "wall_s": round(t_big, 2), "img_per_s": round(big / t_big, 2), "small_images": small,
                "small_wall_s": round(t_small, 2), "img_per_s_marginal": round(marginal, 2) if marginal else None,
                "fixed_s": round(t_small - small / marginal, 2) if marginal else None}
            if device == "cpu" and marginal:
                st.data["rows"][key]["all_cores_img_per_s_estimate"] = round(marginal * cpus, 2)
        except Exception as exc:
            st.data["rows"][key] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:400]}
        st.save()
    rows = st.data["rows"]
    for rate in ("img_per_s_marginal", "img_per_s"):
        if rows.get("gpu", {}).get(rate) and rows.get("cpu", {}).get(rate):
            st.data["gpu_over_cpu" + rate[len("img_per_s"):]] = round(rows["gpu"][rate] / rows["cpu"][rate], 1)
    if rows.get("gpu", {}).get("img_per_s_marginal") and rows.get("cpu", {}).get("all_cores_img_per_s_estimate"):
        st.data["gpu_over_all_cores_estimate"] = round(rows["gpu"]["img_per_s_marginal"] /
                                                       rows["cpu"]["all_cores_img_per_s_estimate"], 1)
    ok = [r for r in rows.values() if r.get("status") == "ok"]
    st.set(status="ok" if len(ok) == len(rows) else ("partial" if ok else "skipped"),
           reason=None if len(ok) == len(rows) else "; ".join(f"{k}: {r.get('reason')}" for k, r in rows.items()
                                                              if r.get("status") != "ok"))


# --- 3. loader --------------------------------------------------------------------------------
def loader_rate(root: Path, batch: int, workers: int, device, window_s: float) -> dict:
    from omegaconf import OmegaConf

    from seit.data.datamodule import TokenDataModule

    cfg = OmegaConf.create({"root": str(root), "subset": None, "train_split": "train", "val_split": "val",
                            "batch_size": batch, "eval_batch_size": batch, "num_workers": workers,
                            "shuffle_buffer": 4096, "pin_memory": device.type == "cuda", "fixed_batches": None})
    dm = TokenDataModule(cfg, seed=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.dataset.batches_per_worker = 1 << 30  # one long pass: no epoch restarts inside the window
    it = iter(loader)
    first = next(it)["ids"].to(device, non_blocking=True)  # worker start-up is not the steady rate
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < window_s:
        ids = next(it)["ids"].to(device, non_blocking=True)
        n += ids.shape[0]
    sync(device)
    secs = time.perf_counter() - start
    del it, loader
    info = dm.load_info()
    return {"grid": f"{first.shape[1]}x{first.shape[2]}", "codec": info.codec, "samples": info.meta["num_samples"],
            "workers": workers, "batch": batch, "samples_per_s": round(n / secs, 1), "window_s": round(secs, 1)}


def stage_loader(st: Stage, args, data: Data, parts: Path) -> None:
    needs("torch", "omegaconf", "pytorch_lightning", "webdataset", "numba", "seit.data.datamodule")
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = SMOKE if args.smoke else FULL
    train = read_json(parts / "throughput.json").get("rows", {}).get("tokens", {}).get("img_per_s")
    st.set(token_vit_b_img_per_s=train, rows={})
    for name in (IN200, TINY20):
        root = data.token_dir(name)
        if root is None:
            st.data["rows"][name] = {"status": "skipped", "reason": f"{data.tokens / name} not found"}
            continue
        if st.left() < (3 if args.smoke else 8):
            st.data["rows"][name] = {"status": "skipped", "reason": f"no time left in the stage ({st.left():.0f} s)"}
            continue
        try:
            row = loader_rate(root, g.batch, 2, device, 1.5 if args.smoke else min(12.0, st.left() / 3))
            side = int(row["grid"].split("x")[0])
            row["status"] = "ok"
            row["vit_b_grid"] = side >= g.token_grid  # holds the ids the token ViT-B reads (crops of 32x32)
            if train:
                row["keeps_up"] = row["samples_per_s"] >= train
                row["headroom"] = round(row["samples_per_s"] / train, 2)
        except Exception as exc:
            row = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:400]}
        st.data["rows"][name] = row
        st.save()
    rows = st.data["rows"]
    ok = [r for r in rows.values() if r.get("status") == "ok"]
    verdict = next((r for r in ok if r.get("vit_b_grid")), None)
    if verdict and "keeps_up" in verdict:
        st.data["keeps_up"] = verdict["keeps_up"]
    st.set(status="ok" if ok else "skipped",
           reason=None if len(ok) == len(rows) else "; ".join(f"{k}: {r.get('reason')}" for k, r in rows.items()
                                                              if r.get("status") != "ok"))


# --- 4. long schedules ------------------------------------------------------------------------
@dataclass
class Job:
    name: str
    overrides: list[str]
    run_dir: Path
    epochs: int
    after: str | None = None
    proc: subprocess.Popen | None = None
    state: str = "waiting"
    started: float = 0.0
    log: Path | None = None
    result: dict = field(default_factory=dict)


def gpu_overrides(args, pixels: bool, jobs: int) -> list[str]:
    """Where and how a long-schedule run trains here (the protocol's own overrides come first)."""
    if args.smoke:
        return ["debug=fast", "trainer.accelerator=cpu", "data.num_workers=0"]
    import torch

    workers = max(1, min(4 if pixels else 2, (cpu_count() - 3 * jobs) // max(3 * jobs, 1)))  # 3 stages at once
    if not torch.cuda.is_available():  # the full protocol on a CPU machine: as the experiment scripts run it
        return ["trainer.accelerator=cpu", f"data.num_workers={workers}"]
    return ["trainer=gpu", f"data.num_workers={workers}", "data.pin_memory=true"]


def data_overrides(data: Data, pixels: bool) -> list[str]:
    if pixels:
        return [f"data.source={data.image_dir('tiny-imagenet-20') or data.images / 'tiny-imagenet-20'}"]
    # the finished dataset is read as it is: no source to compare against, no rebuild
    return [f"paths.data_dir={data.tokens}", "data.build.source=null"]


def long_jobs(kind: str, args, data: Data, jobs: int) -> list[Job]:
    import types

    seeds = [0] if args.smoke else [0, 1]
    out: list[Job] = []

    def add(name, overrides, run_dir, epochs, after=None):
        pixels = any("pixels" in o for o in overrides if o.startswith("experiment="))
        out.append(Job(name, [*overrides, *data_overrides(data, pixels), *gpu_overrides(args, pixels, jobs)],
                       run_dir, epochs, after))

    if kind == "long_mtm":
        import mtm_tiny20 as m

        a = types.SimpleNamespace(pretrain=1 if args.smoke else 200, finetune=1 if args.smoke else 50, probe=10,
                                  soft_tau=0.0)
        for seed in seeds:
            rows = m.rows(seed, a)
            add(f"mtm_s{seed}", [*rows["mtm"], f"seed={seed}"], m.run_dir("mtm", seed), a.pretrain)
            if not args.smoke:  # smoke: the pre-train -> fine-tune chain only (scratch is the ablation's path)
                add(f"scratch_s{seed}", [*rows["scratch"], f"seed={seed}"], m.run_dir("scratch", seed),
                    a.pretrain + a.finetune)
        for seed in seeds:
            add(f"finetune_s{seed}", [*m.rows(seed, a)["finetune"], f"seed={seed}"], m.run_dir("finetune", seed),
                a.finetune, after=f"mtm_s{seed}")
    elif kind == "long_ablation":
        import ablation_tiny20 as ab

        epochs = 1 if args.smoke else 100
        table = ab.rows(args.tokenadapt)
        names = ["pixels"] if args.smoke else list(table)  # smoke: the pixel path (mtm runs the token one)
        for seed in seeds:
            for row in names:
                add(f"{row}_s{seed}", [*table[row], f"trainer.max_epochs={epochs}", "optim.lr=1e-3", f"seed={seed}"],
                    ab.run_dir(row, seed, "long"), epochs)
    else:
        import continual_tiny20 as cl

        epochs = 1 if args.smoke else 15
        reps = ["tokens"] if args.smoke else list(cl.REPRESENTATIONS)
        for seed in seeds:
            for rep in reps:
                d = cl.run_dir(rep, "100KB", "er", seed)
                add(f"{rep}_s{seed}", [*cl.overrides(rep, "100KB", "er", seed), f"trainer.max_epochs={epochs}"],
                    d.with_name(d.name.replace("cl20_", "cl20x3_")), epochs)
    return out


def epochs_done(run_dir: Path) -> int | None:
    """Epochs validated so far: the largest ``epoch`` of a metrics.csv row holding a val/ metric, plus
    one, over every metrics.csv under the run (a continual run's: its latest task's). None: none yet."""
    best = None
    for f in run_dir.rglob("metrics.csv"):
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                validated = any(k.startswith("val/") and v not in (None, "") for k, v in row.items() if k)
                if validated and row.get("epoch") not in (None, ""):
                    best = max(best or 0, int(float(row["epoch"])) + 1)
    return best


def summarize(job: Job) -> dict:
    summary = job.run_dir / "summary.json"
    out = {"run": job.name, "run_dir": str(job.run_dir), "epochs_planned": job.epochs, "state": job.state}
    if summary.is_file():
        s = json.loads(summary.read_text())
        metrics = s.get("metrics", {})
        for key in ("val/acc1", "val/mtm_acc"):
            if key in metrics:
                out[key] = round(100 * metrics[key], 2)
        for key in ("average_incremental_accuracy", "final_accuracy", "forgetting"):
            if key in s:
                out[key] = round(100 * s[key], 2)
        for key in ("wall_s", "train_s", "samples_per_s"):
            if key in s:
                out[key] = round(s[key], 1)
        out["epochs_done"] = job.epochs
    else:
        out["epochs_done"] = epochs_done(job.run_dir)
    return out


def stop(jobs: list[Job], grace_s: float = 10.0) -> None:
    """SIGTERM to each run.py alone (its StopOnSigterm callback writes last.ckpt at the next batch; a
    signal to the whole group would kill its loader workers first), then SIGKILL to the process groups
    of those still there after ``grace_s`` (and to loader workers left behind)."""
    live = [j for j in jobs if j.proc is not None and j.proc.poll() is None]
    for job in live:
        try:
            os.kill(job.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + grace_s
    for job in live:
        try:
            job.proc.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(job.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        job.proc.wait()


def stage_long(st: Stage, args, data: Data, kind: str) -> None:
    needs("hydra", "omegaconf", "pytorch_lightning", "webdataset", "numba")
    if data.token_dir(TINY20) is None:
        raise FileNotFoundError(f"{data.tokens / TINY20} not found (carry it in --data)")
    jobs = args.jobs
    todo = long_jobs(kind, args, data, jobs)
    logs = Path(args.out) / "run_logs" / kind
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SEIT_ROOT": str(Path(args.work) / "root"), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if args.smoke else "2")}
    st.set(jobs=jobs, runs=[])
    margin = 14 if not args.smoke else 4  # to stop the runs and write the summary before the hard limit
    while True:
        for job in todo:
            if job.state == "running" and job.proc.poll() is not None:
                job.state = "finished" if (job.run_dir / "summary.json").is_file() else f"failed (rc {job.proc.returncode})"
        for job in todo:
            if job.state == "waiting" and (job.run_dir / "summary.json").is_file():
                job.state = "finished"  # from an earlier suite run with the same --work
        running = [j for j in todo if j.state == "running"]
        ready = [j for j in todo if j.state == "waiting" and
                 (j.after is None or next(x for x in todo if x.name == j.after).state == "finished")]
        blocked = [j for j in todo if j.state == "waiting" and j.after and
                   next(x for x in todo if x.name == j.after).state.startswith("failed")]
        for j in blocked:
            j.state = f"not run: {j.after} failed"
        if st.left() < margin:
            break
        while ready and len(running) < jobs:
            job = ready.pop(0)
            job.log = logs / f"{job.name}.log"
            cmd = [sys.executable, "run.py", *job.overrides, f"run_name={job.run_dir.name}", "print_config=false"]
            with open(job.log, "w") as fh:
                fh.write(" ".join(cmd[1:]) + "\n")
                fh.flush()
                job.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                            start_new_session=True)
            job.state, job.started = "running", time.monotonic()
            running.append(job)
        if not running and not ready:
            break
        st.set(runs=[{"run": j.name, "state": j.state} for j in todo])
        time.sleep(1.0 if args.smoke else 3.0)
    stop([j for j in todo if j.state == "running"])
    for job in todo:
        if job.state == "running":
            job.state = "stopped at the time limit (the same --work resumes it)"
        elif job.state == "waiting":
            job.state = "skipped: no time left"
    results = [summarize(j) for j in todo]
    for r, j in zip(results, todo):
        if j.state.startswith("failed") and j.log is not None:
            r["log_tail"] = j.log.read_text()[-600:]
    finished = [r for r in results if r["state"] == "finished"]
    skipped = [r for r in results if r["state"] != "finished"]
    progressed = finished or [r for r in results if r["state"].startswith("stopped")]
    st.set(runs=results, status="ok" if not skipped else ("partial" if progressed else "skipped"),
           reason=None if not skipped else f"{len(skipped)} of {len(results)} runs not finished in "
                                           f"{st.data['budget_s']:.0f} s: " + ", ".join(f"{r['run']} ({r['state']})" for r in skipped))


# --- optional: curation on the GPU (bench_curation.py, when it offers --device) -----------------
def curation_hook(args, budget: float) -> dict:
    """``bench_curation.py --device cuda --points N --json OUT`` (k-means, SemDeDup, retrieval k-NN on
    the GPU; that script is another part of #20), in ``budget`` seconds. It imports faiss."""
    script = ROOT / "experiments" / "bench_curation.py"
    text = script.read_text() if script.is_file() else ""
    if "--device" not in text or "--json" not in text:
        return {"stage": "curation", "status": "skipped", "reason": "experiments/bench_curation.py has no --device/--json"}
    if budget < 20:
        return {"stage": "curation", "status": "skipped", "reason": f"no time left ({budget:.0f} s)"}
    out = Path(args.out) / "stages" / "curation.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(script), "--device", "cuda", "--points", str(args.curation_points), "--json", str(out)]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, timeout=budget, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"stage": "curation", "status": "skipped", "reason": f"killed at its time limit ({budget:.0f} s)"}
    result = {"stage": "curation", "wall_s": round(time.monotonic() - t0, 1), "command": " ".join(cmd[1:])}
    if proc.returncode or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**result, "status": "failed", "reason": f"exit code {proc.returncode}: {tail[0][:300]}"}
    return {**result, "status": "ok", "reason": None, **read_json(out)}


# --- orchestration ----------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_child(args) -> None:
    """One stage in this process (``--child NAME``): writes <out>/stages/NAME.json."""
    out = Path(args.out)
    parts = out / "stages"
    st = Stage(parts / f"{args.child}.json", args.child, args.child_budget)
    try:
        data = make_smoke_data(Path(args.work) / "smoke_data") if args.smoke else Data.at(args.data)
        if args.child == "throughput":
            stage_throughput(st, args, data)
        elif args.child == "tokenize":
            work = Path(args.work) / "tokenize"
            work.mkdir(parents=True, exist_ok=True)
            stage_tokenize(st, args, data, work)
        elif args.child == "loader":
            stage_loader(st, args, data, parts)
        else:
            stage_long(st, args, data, args.child)
    except MissingWheel as exc:
        st.set(status="skipped", reason=str(exc))
    except Exception as exc:
        st.set(status="failed", reason=f"{type(exc).__name__}: {exc}"[:600])
        raise


class Child:
    """A stage in a child process (``--child NAME``), killed with its whole process group at
    ``budget`` + 10 s; ``result()`` waits for it and reads what it wrote."""

    def __init__(self, stage: str, args, budget: float):
        parts = Path(args.out) / "stages"
        self.stage, self.budget, self.smoke = stage, budget, args.smoke
        self.path, self.log = parts / f"{stage}.json", parts / f"{stage}.log"
        self.path.unlink(missing_ok=True)
        self.t0, self.proc = time.monotonic(), None
        if budget >= (8 if args.smoke else 15):
            cmd = [sys.executable, __file__, "--child", stage, "--child-budget", f"{budget:.1f}", *args.passthrough]
            with open(self.log, "w") as fh:
                self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)

    def result(self) -> dict:
        if self.proc is None:
            print(f"[{self.stage}] skipped: {self.budget:.0f} s left", flush=True)
            return {"stage": self.stage, "status": "skipped", "reason": f"no time left ({self.budget:.0f} s)"}
        try:
            rc = self.proc.wait(max(0.0, self.t0 + self.budget + 10 - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            rc = None
        result = read_json(self.path) or {"stage": self.stage, "status": "failed", "reason": "the stage wrote no result"}
        if rc is None:
            result.update(status="partial" if result.get("rows") or result.get("runs") else "skipped",
                          reason=f"killed at its time limit ({self.budget:.0f} s); {result.get('reason') or ''}".strip("; "))
        elif rc != 0 and result.get("status") in ("running", "ok"):
            result.update(status="failed", reason=f"exit code {rc}; see {self.log}")
        if result.get("status") == "failed":
            result["log_tail"] = self.log.read_text()[-1500:]
        result.setdefault("wall_s", round(time.monotonic() - self.t0, 1))  # the child's own, when it wrote one
        print(f"[{self.stage}] {result['status']} in {result['wall_s']:.0f} s" +
              (f": {result['reason']}" if result.get("reason") else ""), flush=True)
        return result


def environment(args) -> dict:
    env = {"date": datetime.date.today().isoformat(), "python": platform.python_version(), "cpus": cpu_count(),
           "host_cpu": platform.processor() or platform.machine(), "smoke": args.smoke, "budget_s": args.budget,
           "missing_wheels": [wheel_name(m) for m in missing_modules()]}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["device"] = torch.cuda.get_device_name(0)
            env["device_count"] = torch.cuda.device_count()
        else:
            env["device"] = "cpu (no CUDA device)"
    except ImportError:
        env["torch"] = None
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        env["timm"] = None
    return env


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output dir (default logs/gpu_suite, or logs/gpu_suite_smoke)")
    p.add_argument("--work", default=None, help="scratch: run dirs, checkpoints, tokenize builds (default <out>/work; "
                   "a later suite run with the same --work resumes unfinished long runs)")
    p.add_argument("--data", default=None, help="the data folder (see above); default: ../shared/data + data_cache/tokens")
    p.add_argument("--budget", type=float, default=None, help="seconds for everything, setup included (480; smoke 150)")
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: the same code paths in about a minute")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU (default: PEAK_TFLOPS)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time in each long-schedule stage; the three stages run side by side (default 2; smoke 1)")
    p.add_argument("--tokenize-images", type=int, default=None, help="images tokenized on the GPU (4096; smoke 16)")
    p.add_argument("--cpu-tokenize-images", type=int, default=None, help="images tokenized on the CPU (8; smoke 4)")
    p.add_argument("--tokenadapt", default=None, help="a tokenadapt.safetensors: adds the ablation's TokenAdapt row")
    p.add_argument("--curation", action="store_true",
                   help="also time bench_curation.py --device cuda before the long schedules (needs faiss)")
    p.add_argument("--curation-points", type=int, default=1_000_000, help="synthetic embeddings for --curation")
    p.add_argument("--pack", default=None, metavar="DIR", help="copy what --data needs into DIR and exit")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-budget", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.pack:
        pack(Path(args.pack))
        return
    if args.data:
        args.data = str(Path(args.data).resolve())  # the children run from the repo root
    args.out = str(Path(args.out or ROOT / "logs" / ("gpu_suite_smoke" if args.smoke else "gpu_suite")).resolve())
    args.budget = args.budget or (150.0 if args.smoke else 480.0)
    args.jobs = args.jobs or (1 if args.smoke else 2)
    args.tokenize_images = args.tokenize_images or (16 if args.smoke else 4096)
    args.cpu_tokenize_images = args.cpu_tokenize_images or (4 if args.smoke else 8)
    args.work = str(Path(args.work or Path(args.out) / "work").resolve())
    # the experiment scripts put their run dirs under SEIT_ROOT (read at import): <work>/root/logs/...
    os.environ["SEIT_ROOT"] = str(Path(args.work) / "root")
    if args.child:
        run_child(args)
        return
    start = time.monotonic()
    out = Path(args.out)
    (out / "stages").mkdir(parents=True, exist_ok=True)
    args.passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    args.passthrough += ["--out", args.out, "--work", args.work, "--jobs", str(args.jobs),
                         *(["--data", args.data] if args.data else []),
                         "--tokenize-images", str(args.tokenize_images),
                         "--cpu-tokenize-images", str(args.cpu_tokenize_images)]
    env = environment(args)
    if args.smoke and not env["missing_wheels"]:  # setup: the toy data every stage reads, made once
        make_smoke_data(Path(args.work) / "smoke_data")
    if env["missing_wheels"]:
        print("missing wheels (stages that import them are skipped): " + " ".join(env["missing_wheels"]) +
              "\n  pip install --no-deps --target /tmp/site <wheels> ; export PYTHONPATH=/tmp/site", flush=True)
    print(f"gpu_suite: {env.get('device')}, torch {env.get('torch')}, {env['cpus']} CPUs, budget {args.budget:.0f} s, "
          f"out {out}", flush=True)
    chosen = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        raise SystemExit(f"--stages: unknown {unknown}; choose from {','.join(STAGES)}")
    results: dict[str, dict] = {}
    deadline = start + args.budget - SETUP_S
    for stage in STAGES:
        if stage not in chosen:
            results[stage] = {"stage": stage, "status": "skipped", "reason": "not in --stages"}
        elif stage in SHARES:  # one at a time: each has the GPU (or the CPU cores) to itself
            left = deadline - time.monotonic()
            results[stage] = Child(stage, args, min(left, SMOKE_SECONDS[stage] if args.smoke else
                                                    SHARES[stage] * args.budget)).result()
    if args.curation:
        results["curation"] = curation_hook(args, min(deadline - time.monotonic(), 0.1 * args.budget))
        print(f"[curation] {results['curation']['status']}: {results['curation'].get('reason')}", flush=True)
    # The long schedules run side by side in all the time left (--jobs runs each): small models that
    # leave the GPU mostly idle, so three stages at once finish more runs than three in a row.
    children = [Child(stage, args, deadline - time.monotonic()) for stage in STAGES
                if stage.startswith("long_") and stage in chosen]
    for child in children:
        results[child.stage] = child.result()
    report = {"suite": "experiments/gpu_suite.py", **env, "wall_s": round(time.monotonic() - start, 1),
              "stages": results, "skipped": skipped_lines(results)}
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    md = markdown(report)
    (out / "gpu_suite.md").write_text(md)
    print(md)
    print(f"wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'} in {report['wall_s']:.0f} s", flush=True)


# --- report -----------------------------------------------------------------------------------
def skipped_lines(results: dict) -> list[str]:
    lines = []
    for name, r in results.items():
        if r.get("status") != "ok":
            lines.append(f"{name}: {r.get('status')}: {r.get('reason')}")
    return lines


def fmt(v, spec: str = "", none: str = "-") -> str:
    if v is None:
        return none
    return format(v, spec) if spec else str(v)


def reason_row(labels: list, row: dict, columns: int) -> str:
    """A table row for what was not measured: its labels, then its status and reason, the rest empty."""
    cells = [str(x) for x in labels] + [f"{row.get('status')}: {row.get('reason')}"]
    return "| " + " | ".join(cells + [""] * (columns - len(cells))) + " |"


def markdown(rep: dict) -> str:
    st = rep["stages"]
    lines = [f"GPU suite: **{rep.get('device')}**, {rep['date']}, torch {rep.get('torch')} (CUDA {rep.get('cuda')}), "
             f"timm {rep.get('timm')}, {rep['cpus']} CPU cores; wall {rep['wall_s']:.0f} s of a {rep['budget_s']:.0f} s "
             f"budget{' (--smoke: toy sizes, not results)' if rep['smoke'] else ''}.", ""]
    t = st.get("throughput", {})
    setup = (f"batch {t.get('batch')}, {t.get('precision')}, torch.compile {t.get('compile_backend')}; "
             if t.get("batch") else "")
    lines += [f"**1. Train throughput** ({setup}FLOPs of forward + backward by FlopCounterMode; MFU against "
              f"{fmt(t.get('peak_bf16_tflops'))} TFLOP/s dense bf16)", "",
              "| model | input | img/s | step ms | GFLOP/img | TFLOP/s | MFU | peak GiB |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key, r in (t.get("rows") or {}).items():
        if r.get("status") == "ok":
            gf = r["flops_per_img"] / 1e9 if r.get("flops_per_img") else None
            gf = None if gf is None else float(f"{gf:.3g}")
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            lines.append(f"| {r['model']} | {r['feed']} | {r['img_per_s']:,.0f} | {r['step_ms']:.1f} | {fmt(gf)} | "
                         f"{fmt(r.get('achieved_tflops'), '.3g')} | {mfu} | {fmt(r.get('peak_mem_gib'))} |")
        else:
            lines.append(reason_row([r.get('model', key), key], r, 8))
    if t.get("status") not in ("ok", "partial"):
        lines.append(f"\n{t.get('status')}: {t.get('reason')}")
    if t.get("token_over_pixel"):
        lines.append(f"\nToken ViT-B over pixel ViT-B/16 (tensors): **x{t['token_over_pixel']}** img/s.")
    k = st.get("tokenize", {})
    lines += ["", f"**2. Tokenize** ({k.get('encoder')}; {k.get('source')}; {k.get('codec')}; "
              "seit.pipelines.tokenize end to end: decode, encode, codec, shards; per image = the difference of a "
              "small and a big build, without the fixed costs)", "",
              "| path | images | decode workers | encoder threads | wall s | img/s end to end | fixed s | img/s per image |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in (k.get("rows") or {}).items():
        if r.get("status") == "ok":
            lines.append(f"| {key} | {r['images']} | {r['decode_workers']} | {r['torch_threads']} | {r['wall_s']:.1f} | "
                         f"{r['img_per_s']:,.2f} | {fmt(r.get('fixed_s'), '.1f')} | {fmt(r.get('img_per_s_marginal'), ',.2f')} |")
        else:
            lines.append(reason_row([key], r, 8))
    cpu = (k.get("rows") or {}).get("cpu", {})
    if cpu.get("all_cores_img_per_s_estimate"):
        lines.append(f"\nThe CPU row is one core (one worker decodes and encodes, one thread); all "
                     f"{rep['cpus']} cores would give about {cpu['all_cores_img_per_s_estimate']:,.1f} img/s "
                     "(x cores, an estimate).")
    if k.get("gpu_over_cpu_marginal") or k.get("gpu_over_cpu"):
        lines.append(f"\nGPU over one CPU core: **x{fmt(k.get('gpu_over_cpu_marginal'))}** per image, "
                     f"x{fmt(k.get('gpu_over_cpu'))} end to end; over all cores (estimate): "
                     f"x{fmt(k.get('gpu_over_all_cores_estimate'))}.")
    if k.get("status") not in ("ok", "partial"):
        lines.append(f"\n{k.get('status')}: {k.get('reason')}")
    ld = st.get("loader", {})
    lines += ["", f"**3. Token loader, 2 workers** against the token ViT-B's {fmt(ld.get('token_vit_b_img_per_s'), ',.0f')} "
              "train img/s (host-to-device copy included)", "",
              "| token dataset | grid | codec | samples/s | x the ViT-B's rate | keeps up |", "|---|---|---|---:|---:|---|"]
    for name, r in (ld.get("rows") or {}).items():
        if r.get("status") == "ok":
            note = "" if r.get("vit_b_grid") else " (smaller grid than the ViT-B's 32x32)"
            lines.append(f"| {name} | {r['grid']}{note} | {r['codec']} | {r['samples_per_s']:,.0f} | {fmt(r.get('headroom'))} | "
                         f"{fmt({True: 'yes', False: '**no**'}.get(r.get('keeps_up')))} |")
        else:
            lines.append(reason_row([name], r, 6))
    if ld.get("status") not in ("ok", "partial"):
        lines.append(f"\n{ld.get('status')}: {ld.get('reason')}")
    titles = {"long_mtm": "4a. MTM pre-train 200 + fine-tune 50 against scratch 250 (mtm_tiny20.py rows)",
              "long_ablation": "4b. Augmentation ablation at 100 epochs, lr 1e-3 (ablation_tiny20.py --tag long)",
              "long_continual": "4c. Class-incremental, 15 epochs per task, 100 KB memory, ER (continual_tiny20.py)"}
    for name, title in titles.items():
        r = st.get(name, {})
        lines += ["", f"**{title}**", ""]
        runs = r.get("runs") or []
        if not runs or isinstance(runs[0], dict) and "epochs_planned" not in runs[0]:
            lines.append(f"{r.get('status')}: {r.get('reason')}")
            continue
        lines += ["| run | epochs validated / planned | val top-1 (mtm: masked-token acc.) | avg incr. / final acc. | state |",
                  "|---|---:|---:|---:|---|"]
        for run in runs:
            acc = run.get("val/acc1", run.get("val/mtm_acc"))
            cl = (f"{run['average_incremental_accuracy']:.1f} / {run['final_accuracy']:.1f}"
                  if "final_accuracy" in run else "-")
            lines.append(f"| {run['run']} | {fmt(run.get('epochs_done'))} / {run['epochs_planned']} | {fmt(acc, '.1f')} | "
                         f"{cl} | {run['state']} |")
    if "curation" in st:
        c = st["curation"]
        lines += ["", "**Curation on the GPU** (experiments/bench_curation.py)", ""]
        if c.get("status") == "ok":
            lines += [f"`{c.get('command')}`: {c.get('points'):,} points, d={c.get('dim')}, k={c.get('k')}", "",
                      "| k-means s | SemDeDup s | retrieval k-NN s |", "|---:|---:|---:|",
                      f"| {fmt(c.get('kmeans_s'))} | {fmt(c.get('semdedup_s'))} | {fmt(c.get('retrieval_knn_s'))} |"]
        else:
            lines.append(f"{c.get('status')}: {c.get('reason')}")
    if rep["skipped"]:
        lines += ["", "Skipped or cut short:", "", *[f"- {s}" for s in rep["skipped"]]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
