"""What the token augmentations add to a training step, as a ratio measured side by side.

    python experiments/bench_augment.py --grid 16 --crop 14 --model micro     # tiny-imagenet-20 geometry
    python experiments/bench_augment.py --grid 32 --crop 28 --model base --batch 16 --tokenadapt-width 384  # SeiT++

One process, the same model and batch; training steps (augmentation + forward + backward +
AdamW) alternate between the recipes so that machine noise hits them alike, and the median
step time of each is reported. The issue's budget: at most 15% over no augmentation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from seit.augment.pipeline import AugConfig, augment_tokens  # noqa: E402
from seit.models.tokenadapt import TokenAdapt  # noqa: E402
from seit.models.vit import TokenViT  # noqa: E402
from seit.tokenizers.codebook_tools import synonyms  # noqa: E402

MODELS = {"micro": dict(embed_dim=128, depth=4, num_heads=4), "tiny": dict(embed_dim=192, depth=12, num_heads=3),
          "small": dict(embed_dim=384, depth=12, num_heads=6), "base": dict(embed_dim=768, depth=12, num_heads=12)}
SEIT = {"rrc": {"enabled": True}, "eda": {"replace_prob": 0.25, "swap_prob": 0.25}, "noise": {"prob": 0.5},
        "mix": {"cutmix_alpha": 1.0}}
RECIPES = {
    "random crop only": {},
    "SeiT (EDA, RRC, noise, CutMix)": SEIT,
    "SeiT++ colour (RRC, noise/ColorAdapt, CutMix)": {"rrc": {"enabled": True}, "noise": {"prob": 0.75},
                                                      "color_adapt": {"prob": 0.25}, "mix": {"cutmix_alpha": 1.0}},
    "SeiT + TokenAdapt half batch": {**SEIT, "tokenadapt": {"share": 0.5}},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--crop", type=int, default=14)
    parser.add_argument("--model", default="micro", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--codebook", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tokenadapt-width", type=int, default=128, help="tokenadapt_tiny20 trains width 128")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    k, d, classes = args.codebook, 32, 100
    model = TokenViT(input="tokens", input_size=args.crop, num_classes=classes, codebook_size=k, codebook_dim=d,
                     **MODELS[args.model])
    codebook = F.normalize(torch.randn(k, d), dim=1)
    model.embed.load_codebook(codebook)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    table = synonyms(codebook, 5)
    heads = max(1, args.tokenadapt_width // 64)  # 64-wide heads, as the reference (384 wide, 6 heads)
    adapt = TokenAdapt(codebook, width=args.tokenadapt_width, heads=heads).eval().requires_grad_(False)
    ids = torch.randint(0, k, (args.batch, args.grid, args.grid))
    labels = torch.randint(0, classes, (args.batch,))
    gen = torch.Generator()

    def step(recipe: dict) -> float:
        cfg = AugConfig.from_dict({"crop": args.crop, **recipe})
        start = time.perf_counter()
        x, targets = augment_tokens(ids, labels, model.embed, cfg, classes, 0.1, table, gen,
                                    adapt=adapt if "tokenadapt" in recipe else None)
        loss = F.cross_entropy(model(x), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    times = {name: [] for name in RECIPES}
    for recipe in RECIPES.values():  # warm-up
        step(recipe)
    for _ in range(args.rounds):
        for name, recipe in RECIPES.items():
            times[name].append(step(recipe))
    base = statistics.median(times["random crop only"])
    rows = {name: {"median_step_s": round(statistics.median(t), 4),
                   "vs_random_crop": round(statistics.median(t) / base, 3)} for name, t in times.items()}
    result = {"args": vars(args), "threads": torch.get_num_threads(), "rows": rows}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
