"""The class-incremental protocol: which classes each task brings, and how the runs are scored.

Classes are renumbered by their position in the task order ("slots"): task t owns the slots
``[t*k, (t+1)*k)``, so the classes seen after task t are always the first slots of the head, and
the logits of later tasks' classes can be cut off instead of masked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def class_order(num_classes: int, seed: int, order: list[int] | None = None) -> list[int]:
    """``order`` when given (checked to be a permutation), else a permutation seeded by ``seed``."""
    if order is None:
        return [int(c) for c in np.random.default_rng(seed).permutation(num_classes)]
    order = [int(c) for c in order]
    if sorted(order) != list(range(num_classes)):
        raise ValueError(f"task.class_order must list each of the {num_classes} classes once, got {order}")
    return order


def split_tasks(order: list[int], num_tasks: int) -> list[list[int]]:
    """Consecutive, equal groups of the order; a class count that does not divide is an error."""
    if num_tasks < 1 or len(order) % num_tasks:
        raise ValueError(f"{len(order)} classes do not split into task.num_tasks={num_tasks} equal tasks")
    k = len(order) // num_tasks
    return [order[t * k:(t + 1) * k] for t in range(num_tasks)]


@dataclass
class AccuracyMatrix:
    """Per-class correct and total counts of the evaluation after each task.

    ``acc[i, j]``: accuracy on task j's classes after training task i (NaN for j > i, never evaluated).
    """

    tasks: list[list[int]]
    correct: dict[int, dict[int, int]] = field(default_factory=dict)  # task -> class -> correct
    total: dict[int, dict[int, int]] = field(default_factory=dict)

    def record(self, task: int, correct: dict[int, int], total: dict[int, int]) -> None:
        seen = {c for t in self.tasks[:task + 1] for c in t}
        if set(total) != seen:
            raise ValueError(f"evaluation after task {task} covered classes {sorted(total)}, expected the seen "
                             f"classes {sorted(seen)}")
        self.correct[task], self.total[task] = dict(correct), dict(total)

    def _acc(self, task: int, classes: list[int]) -> float:
        n = sum(self.total[task][c] for c in classes)
        return sum(self.correct[task][c] for c in classes) / n if n else float("nan")

    @property
    def acc(self) -> np.ndarray:
        T = len(self.tasks)
        out = np.full((T, T), np.nan)
        for i in self.correct:
            for j in range(i + 1):
                out[i, j] = self._acc(i, self.tasks[j])
        return out

    def seen_accuracy(self, task: int) -> float:
        """Accuracy over every sample of the classes seen so far (sample-weighted)."""
        return self._acc(task, [c for t in self.tasks[:task + 1] for c in t])

    def summary(self) -> dict:
        done = sorted(self.correct)
        acc = self.acc
        out = {"accuracy_matrix": [[None if np.isnan(v) else round(float(v), 6) for v in row] for row in acc],
               "seen_accuracy": [round(self.seen_accuracy(t), 6) for t in done],
               "tasks_done": len(done)}
        if done:
            out["average_incremental_accuracy"] = round(float(np.mean(out["seen_accuracy"])), 6)
            out["final_accuracy"] = out["seen_accuracy"][-1]
        last = done[-1] if done else -1
        if last >= 1:  # Chaudhry et al.: the best earlier accuracy of each old task minus its accuracy now
            drops = [np.nanmax(acc[j:last, j]) - acc[last, j] for j in range(last)]
            out["forgetting"] = round(float(np.mean(drops)), 6)
        return out


def matrix_png(acc: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = len(acc)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * T, 1.0 + 0.8 * T))
    ax.imshow(np.ma.masked_invalid(acc), cmap="viridis", vmin=0, vmax=1)
    for i in range(T):
        for j in range(i + 1):
            if not np.isnan(acc[i, j]):
                ax.text(j, i, f"{100 * acc[i, j]:.0f}", ha="center", va="center",
                        color="white" if acc[i, j] < 0.6 else "black", fontsize=9)
    ax.set_xticks(range(T), [f"T{j}" for j in range(T)])
    ax.set_yticks(range(T), [f"after T{i}" for i in range(T)])
    ax.set_xlabel("evaluated on the classes of")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
