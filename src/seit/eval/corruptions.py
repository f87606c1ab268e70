"""ImageNet-C corruptions (Hendrycks & Dietterich, ICLR 2019, "Benchmarking Neural Network Robustness
to Common Corruptions and Perturbations") through the PyPI package ``imagecorruptions`` (Michaelis et
al. 2019), made reproducible and runnable on today's libraries.

``corrupt_image(image, name, severity, seed)``: uint8 ``[H, W, 3]`` -> uint8 ``[H, W, 3]``; severity
0 returns the image itself (clean), 1-5 the package's corruption at that strength. The 15 benchmark
corruptions are ``CORRUPTIONS`` (noise, blur, weather, digital); the package's 4 held-out ones
(``VALIDATION``) may be named too.

Four incompatibilities of imagecorruptions 1.1.2 (2020, the last release) with the pinned stack are
fixed here for its own module only, nothing global changes:

- it imports ``pkg_resources`` (gone from setuptools >= 81) for the path of its bundled frost
  images: a stand-in is present only while it is imported;
- ``fog`` uses ``np.float_`` (removed in numpy 2): the module sees numpy with that alias;
- ``gaussian_blur`` and ``glass_blur`` call ``skimage.filters.gaussian(multichannel=True)``
  (removed in scikit-image 0.21): translated to ``channel_axis=-1``;
- ``impulse_noise``'s ``skimage.util.random_noise`` draws from a fresh generator in scikit-image
  >= 0.19: it is handed a seed drawn from numpy's global state, so seeding numpy fixes it again,
  as it did when the package was written.

Every corruption draws from numpy's global random state; ``corrupt_image`` seeds it from
(seed, corruption, severity, image index), so a result does not depend on the order, the process or
the rank an image is corrupted in.

Sizes: the package refuses images under 32 px a side (raised here as ``CorruptionError`` naming
the corruption); from 32 px up every one of the 19 runs (checked at 32, 33, 48, 64, 100 and 224 px).
Its parameters are in pixels and were calibrated on 224 px ImageNet images, so at 64 px the blurs
and the frost/snow textures are relatively stronger; ``eval.robustness.corrupt_size`` corrupts at
another size (see ``seit.eval.robustness``).

CPU time per image, one core, mean over severities 1-5 (``python -m seit.eval.corruptions 32 64 224 [--source DIR]``
prints the table): glass_blur is by far the slowest (a Python loop over pixels: ~30 ms at 32 px,
~135 ms at 64 px, ~2.7 s at 224 px); zoom_blur ~12 ms at 64 px, ~130 ms at 224 px; the rest take 0.1-10 ms.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import sys
import types
from pathlib import Path

import numpy as np

# The benchmark's 15, in ImageNet-C's order (noise, blur, weather, digital), and the 4 held out for validation.
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
VALIDATION = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
GROUPS = {"all": CORRUPTIONS, "noise": CORRUPTIONS[0:3], "blur": CORRUPTIONS[3:7], "weather": CORRUPTIONS[7:11],
          "digital": CORRUPTIONS[11:15], "validation": VALIDATION}
MIN_SIZE = 32  # imagecorruptions refuses smaller images
_INDEX = {name: i for i, name in enumerate(CORRUPTIONS + VALIDATION)}


class CorruptionError(ValueError):
    """A corruption that cannot be applied; the message names it."""


def resolve(spec, where: str = "eval.robustness.corruptions") -> list[str]:
    """Corruption names from ``all`` (the 15), a group name (noise, blur, weather, digital,
    validation), or a list of names and groups; unknown names are refused with the known ones."""
    items = [spec] if isinstance(spec, str) else list(spec or [])
    if not items:
        raise CorruptionError(f"{where} is empty: name corruptions, a group ({', '.join(GROUPS)}) or all")
    names: list[str] = []
    for item in items:
        item = str(item)
        if item not in GROUPS and item not in _INDEX:
            raise CorruptionError(f"{where}: unknown corruption {item!r}; known: {', '.join(CORRUPTIONS + VALIDATION)} "
                                  f"or a group: {', '.join(GROUPS)}")
        names += [n for n in GROUPS.get(item, (item,)) if n not in names]
    return names


def seed_of(seed: int, name: str, severity: int, index: int) -> int:
    """The numpy seed of one corrupted image: fixed by (seed, corruption, severity, image index)."""
    return int(np.random.SeedSequence([int(seed), _INDEX[name], int(severity), int(index)]).generate_state(1)[0])


def corrupt_image(image: np.ndarray, name: str, severity: int, seed: int = 0, index: int = 0,
                  where: str = "an image") -> np.ndarray:
    """``image`` (uint8 [H, W, 3], H and W >= 32) corrupted by ``name`` at ``severity`` (0 = clean,
    returned as is; 1-5), reproducibly for (seed, name, severity, index). CorruptionError names the
    corruption and ``where`` when it cannot be applied."""
    if name not in _INDEX:
        raise CorruptionError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS + VALIDATION)}")
    if not 0 <= int(severity) <= 5:
        raise CorruptionError(f"corruption {name}: severity {severity} is not in 0..5 (0 = clean)")
    if int(severity) == 0:
        return image
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise CorruptionError(f"corruption {name}: expects a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < MIN_SIZE:
        raise CorruptionError(f"corruption {name} needs images of at least {MIN_SIZE}x{MIN_SIZE} px "
                              f"(imagecorruptions); {where} is {image.shape[0]}x{image.shape[1]}: set "
                              f"eval.robustness.corrupt_size>={MIN_SIZE} to corrupt at that size and resize back")
    corrupt = _package().corrupt
    np.random.seed(seed_of(seed, name, severity, index))
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # zoom_blur / snow print when they crop a rounding overhang
            out = corrupt(image, severity=int(severity), corruption_name=name)
    except Exception as exc:  # the package raises AttributeError, ValueError, cv2.error ...
        raise CorruptionError(f"corruption {name} (severity {severity}) failed on {where} "
                              f"({image.shape[0]}x{image.shape[1]}): {type(exc).__name__}: {exc}") from exc
    if out.shape != image.shape:
        raise CorruptionError(f"corruption {name} (severity {severity}) turned {where} from {image.shape} into "
                              f"{out.shape}")
    return out


@functools.cache
def _package() -> types.ModuleType:
    """``imagecorruptions``, imported with the fixes of the module doc applied to its own namespace."""
    try:
        if importlib.util.find_spec("pkg_resources") is None:
            sys.modules["pkg_resources"] = _pkg_resources()
            try:
                import imagecorruptions
            finally:
                sys.modules.pop("pkg_resources", None)
        else:
            import imagecorruptions
    except ImportError as exc:
        raise CorruptionError(f"eval=robustness needs the package imagecorruptions ({exc}); install it with "
                              "`pip install -c constraints.txt imagecorruptions` (it is in setup.cfg)") from None
    import cv2
    import skimage.color
    import skimage.filters
    import skimage.util

    # OpenCV's thread pool does not survive fork: a DataLoader worker forked after the pool started
    # hangs in its first parallel call (seen in cv2.setNumThreads). Corruptions run an image per
    # process anyway, so OpenCV runs sequentially here (the package is its only user in seit).
    cv2.setNumThreads(0)
    module = sys.modules["imagecorruptions.corruptions"]
    if not hasattr(np, "float_"):
        module.np = _Namespace("numpy", np, float_=np.float64)
    module.gaussian = _gaussian(skimage.filters.gaussian)
    module.sk = _Namespace("skimage", skimage, color=skimage.color,
                           util=_Namespace("skimage.util", skimage.util,
                                           random_noise=_seeded_random_noise(skimage.util.random_noise)))
    return imagecorruptions


def _pkg_resources() -> types.ModuleType:
    stand_in = types.ModuleType("pkg_resources")

    def resource_filename(package: str, name: str) -> str:
        return str(Path(importlib.util.find_spec(package).origin).parent / name)

    stand_in.resource_filename = resource_filename
    return stand_in


class _Namespace(types.ModuleType):
    """A module's attributes, with some replaced."""

    def __init__(self, name: str, base, **overrides):
        super().__init__(name)
        self._base = base
        self.__dict__.update(overrides)

    def __getattr__(self, attr):
        return getattr(self._base, attr)


def _gaussian(gaussian):
    def call(image, sigma=1, multichannel=None, **kwargs):
        if multichannel is not None:
            kwargs["channel_axis"] = -1 if multichannel else None
        return gaussian(image, sigma=sigma, **kwargs)

    return call


def _seeded_random_noise(random_noise):
    def call(image, **kwargs):
        kwargs.setdefault("rng", int(np.random.randint(2**31 - 1)))
        return random_noise(image, **kwargs)

    return call


def _timing(sizes: list[int], source: str | None = None, count: int = 20) -> None:
    """Print the CPU ms per image of each corruption (mean over severities 1-5) at each size: on
    ``count`` images of ``source``'s val split (class by class in turn), else on one noise image."""
    import time

    if source:
        from seit.data.image_source import load_image, scan_source

        records = scan_source(source)[0]["val"]
        by_class: dict[int, list] = {}
        for r in records:
            by_class.setdefault(r.label, []).append(r)
        picked = [rs[k] for k in range(max(map(len, by_class.values()))) for rs in by_class.values() if k < len(rs)]
        images = {s: [load_image(r, s).transpose(1, 2, 0).copy() for r in picked[:count]] for s in sizes}
    else:
        rng = np.random.default_rng(0)
        images = {s: [rng.integers(0, 256, (s, s, 3), dtype=np.uint8)] for s in sizes}
    print(f"CPU ms per image, mean over severities 1-5, {len(images[sizes[0]])} image(s)"
          + (f" of {source}" if source else " (noise)"))
    print("| corruption | " + " | ".join(f"{s} px" for s in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for name in CORRUPTIONS + VALIDATION:
        cells = []
        for s in sizes:
            start = time.process_time()
            for index, image in enumerate(images[s]):
                for severity in range(1, 6):
                    corrupt_image(image, name, severity, index=index)
            cells.append(f"{(time.process_time() - start) / (5 * len(images[s])) * 1000:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="CPU time of each corruption per image")
    parser.add_argument("sizes", nargs="*", type=int, default=[32, 64])
    parser.add_argument("--source", help="an image folder with a val split (default: a noise image)")
    parser.add_argument("--images", type=int, default=20, help="images of --source to time")
    args = parser.parse_args()
    _timing(args.sizes, args.source, args.images)
