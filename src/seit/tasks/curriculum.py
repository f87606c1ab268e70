"""The grid-size curriculum: train on small inputs early, then grow them to the final size.

Irandoust et al. 2022 ("multi-size training", ``../shared/reference/curation-and-efficient-vit.md``
§6.3): the best run starts ImageNet at 32 px and adds 32 px every 5 epochs up to 224, so the
first epochs see 4 patches per image instead of 196 and cost a fraction of a full-size epoch.
Here a size is the side of the training crop in input units: token ids for token data (the
Token-RRC output grid, e.g. 8 -> 16 -> 24 -> 32 for a 32x32 dataset), pixels for images.

The ViT keeps one position embedding at the final grid and reads it bicubic-resampled to each
smaller grid (timm's ``dynamic_img_size``): each stage starts from the interpolated embedding, as
the paper's, and evaluation at the final size reads the embedding itself, without the paper's
round trip through the small grid. The stage is a function of the epoch only, so a run resumed
from any checkpoint trains at the size the uninterrupted run did.

Config (``task.curriculum``): ``steps`` [[epoch, size], ...] or ``start`` / ``step`` / ``every``
(``min(final, start + step * (epoch // every))``); ``eval_on_final_size`` (default true: validate
at the final size throughout; false: at the current size); ``batch_sizes`` [[epoch, batch], ...]:
optional per-device training batch steps (the paper's ``--decrease-batch-size``), which rebuild
the training loader every epoch (``seit.data.batch_schedule``).
"""

from __future__ import annotations

from dataclasses import dataclass

KEYS = ("steps", "start", "step", "every", "eval_on_final_size", "batch_sizes")


@dataclass(frozen=True)
class GridCurriculum:
    """Training crop side per epoch: ``stages`` are (first epoch, size), epochs ascending from 0."""

    stages: tuple[tuple[int, int], ...]
    final: int
    eval_on_final_size: bool = True
    batch_steps: tuple[tuple[int, int], ...] = ()  # (first epoch, per-device batch); () = data.batch_size

    @classmethod
    def from_config(cls, cfg: dict | None, *, final: int, stride: int) -> "GridCurriculum | None":
        """The curriculum ``cfg`` describes, None when it sets neither ``steps`` nor ``start``.

        ``final``: the full training crop (``aug.crop``); ``stride``: the model's patch stride (2 for
        the token stems, ``model.patch_size`` for pixels): every size must be a multiple of it.
        Raises ValueError naming the ``task.curriculum`` key at fault.
        """
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - set(KEYS))
        if unknown:
            raise ValueError(f"unknown task.curriculum keys {unknown}; known: {list(KEYS)}")
        steps, start = cfg.get("steps"), cfg.get("start")
        batch_steps = tuple((int(e), int(b)) for e, b in cfg.get("batch_sizes") or ())
        if steps is None and start is None:
            if batch_steps:
                raise ValueError("task.curriculum.batch_sizes needs a size schedule (task.curriculum.steps or start)")
            return None
        if steps is not None and start is not None:
            raise ValueError("task.curriculum: give steps or start/step/every, not both")
        if steps is not None:
            stages = tuple((int(e), int(s)) for e, s in steps)
        else:
            step, every = cfg.get("step"), cfg.get("every")
            if not step or not every or int(step) <= 0 or int(every) <= 0:
                raise ValueError(f"task.curriculum.start={start} needs step > 0 and every > 0 "
                                 f"(got step={step}, every={every})")
            stages, size, epoch = [], int(start), 0
            while size < final:
                stages.append((epoch, size))
                size, epoch = size + int(step), epoch + int(every)
            stages.append((epoch, final))
            stages = tuple(stages)
        curriculum = cls(stages, final, bool(cfg.get("eval_on_final_size", True)), batch_steps)
        curriculum.check(stride)
        return curriculum

    def check(self, stride: int) -> None:
        epochs = [e for e, _ in self.stages]
        if not self.stages or epochs[0] != 0:
            raise ValueError(f"task.curriculum.steps must start at epoch 0, got {[list(s) for s in self.stages]}")
        if any(b <= a for a, b in zip(epochs, epochs[1:])):
            raise ValueError(f"task.curriculum.steps epochs must increase, got {epochs}")
        for epoch, size in self.stages:
            if not stride <= size <= self.final or size % stride:
                raise ValueError(f"task.curriculum: size {size} (epoch {epoch}) must be a multiple of the model's "
                                 f"patch stride {stride} between {stride} and the final crop {self.final}")
        if self.batch_steps:
            epochs = [e for e, _ in self.batch_steps]
            if epochs[0] != 0 or any(b <= a for a, b in zip(epochs, epochs[1:])):
                raise ValueError(f"task.curriculum.batch_sizes epochs must start at 0 and increase, got {epochs}")
            if any(b < 1 for _, b in self.batch_steps):
                raise ValueError(f"task.curriculum.batch_sizes must be >= 1, got {[b for _, b in self.batch_steps]}")

    def size_at(self, epoch: int) -> int:
        """The training crop side of ``epoch`` (0-based)."""
        return next(size for first, size in reversed(self.stages) if epoch >= first)

    def batch_size_at(self, epoch: int) -> int | None:
        """The per-device training batch of ``epoch``; None without batch steps (``data.batch_size``)."""
        return next((b for first, b in reversed(self.batch_steps) if epoch >= first), None)

    def eval_size_at(self, epoch: int) -> int:
        return self.final if self.eval_on_final_size else self.size_at(epoch)

    def describe(self) -> str:
        """'epochs 0-4: 8, 5-9: 16, 10+: 32' (the log line at fit start; then the batch steps, if any)."""
        text = "epochs " + spans(self.stages)
        return text + (f"; batch per device: epochs {spans(self.batch_steps)}" if self.batch_steps else "")


def spans(steps: tuple[tuple[int, int], ...]) -> str:
    parts = []
    for i, (first, value) in enumerate(steps):
        last = steps[i + 1][0] - 1 if i + 1 < len(steps) else None
        span = f"{first}+" if last is None else (f"{first}" if last == first else f"{first}-{last}")
        parts.append(f"{span}: {value}")
    return ", ".join(parts)
