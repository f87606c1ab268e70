"""Continual learning: the protocol's bookkeeping, the byte-budgeted memory, and the task's loss."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from seit.continual.memory import (JpegSamples, ReplayMemory, TokenSamples, balanced_quota, herding_order,
                                   parse_bytes)
from seit.continual.protocol import AccuracyMatrix, class_order, split_tasks
from seit.data.codec import get_codec
from seit.data.image_source import ImageRecord, load_image

NUM_CLASSES = 6


def token_samples(per_class: int = 40, grid: int = 8, seed: int = 0) -> TokenSamples:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    # class-dependent structure so that chunks compress unevenly, as real tokens do
    ids = (rng.integers(0, 64, (len(labels), grid, grid)) * (1 + labels[:, None, None] % 3)).astype(np.uint16)
    return TokenSamples(ids, labels, get_codec("zstd-planes"), codebook_size=256)


def jpeg_samples(tmp_path, per_class: int = 6, size: int = 16) -> JpegSamples:
    rng = np.random.default_rng(0)
    records = []
    for c in range(NUM_CLASSES):
        for i in range(per_class):
            path = tmp_path / f"c{c}_{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, quality=60 + 5 * c)
            records.append(ImageRecord(f"c{c}/{i}", c, str(path)))
    return JpegSamples(records, image_size=size)


def run_tasks(memory: ReplayMemory, tasks: list[list[int]], feature_dim: int = 5) -> list[dict]:
    rng = np.random.default_rng(1)
    features = rng.normal(size=(len(memory.samples.labels), feature_dim))
    stats = []
    for t, classes in enumerate(tasks):
        seen = sum(len(g) for g in tasks[:t + 1])
        new = np.flatnonzero(np.isin(memory.samples.labels, classes))
        stats.append(memory.update(t, new, logit_dim=seen, features=lambda idx: features[idx],
                                   logits=lambda idx: rng.normal(size=(len(idx), seen))))
    return stats


# -- protocol -----------------------------------------------------------------------------------
def test_class_order_is_seeded_and_an_explicit_order_is_checked():
    assert class_order(20, 3) == class_order(20, 3) != class_order(20, 4)
    assert sorted(class_order(20, 3)) == list(range(20))
    assert class_order(4, 0, [3, 1, 0, 2]) == [3, 1, 0, 2]
    with pytest.raises(ValueError, match="each of the 4 classes once"):
        class_order(4, 0, [0, 1, 1, 2])
    assert split_tasks(list(range(6)), 3) == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="do not split"):
        split_tasks(list(range(20)), 3)


def test_accuracy_matrix_bookkeeping():
    tasks = [[0, 1], [2, 3], [4, 5]]
    m = AccuracyMatrix(tasks)
    m.record(0, {0: 9, 1: 7}, {0: 10, 1: 10})
    m.record(1, {0: 5, 1: 3, 2: 10, 3: 8}, {0: 10, 1: 10, 2: 10, 3: 10})
    m.record(2, {0: 2, 1: 2, 2: 6, 3: 6, 4: 9, 5: 9}, {c: 10 for c in range(6)})
    acc = m.acc
    assert acc.shape == (3, 3) and np.isnan(acc[0, 1]) and np.isnan(acc[0, 2]) and np.isnan(acc[1, 2])
    assert acc[0, 0] == pytest.approx(0.8) and acc[1, 0] == pytest.approx(0.4) and acc[2, 2] == pytest.approx(0.9)
    s = m.summary()
    assert s["seen_accuracy"] == pytest.approx([0.8, 0.65, 34 / 60])
    assert s["average_incremental_accuracy"] == pytest.approx(np.mean([0.8, 0.65, 34 / 60]))
    assert s["final_accuracy"] == pytest.approx(34 / 60)
    # task 0: best 0.8, now 0.2; task 1: best 0.9, now 0.6
    assert s["forgetting"] == pytest.approx(np.mean([0.6, 0.3]))
    with pytest.raises(ValueError, match="expected the seen classes"):
        AccuracyMatrix(tasks).record(0, {0: 1, 1: 1, 2: 1}, {0: 1, 1: 1, 2: 1})  # a future class evaluated


def test_parse_bytes():
    assert parse_bytes("100KB") == 100_000 and parse_bytes("1MB") == 10**6 and parse_bytes("2KiB") == 2048
    assert parse_bytes(5000) == 5000 and parse_bytes("1.5 MB") == 1_500_000
    with pytest.raises(ValueError, match="byte count"):
        parse_bytes("ten megs")


# -- selection helpers ----------------------------------------------------------------------------
def test_balanced_quota_water_fills():
    assert balanced_quota(10, {0: 100, 1: 100, 2: 100}) == {0: 4, 1: 3, 2: 3}
    assert balanced_quota(10, {0: 2, 1: 100, 2: 100}) == {0: 2, 1: 4, 2: 4}
    assert balanced_quota(500, {0: 2, 1: 3}) == {0: 2, 1: 3}


def test_herding_prefixes_track_the_class_mean_better_than_random_prefixes():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(200, 16)) + 0.5
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    order = herding_order(f)
    assert sorted(order) == list(range(200))
    mu = f.mean(0)
    for k in (5, 20):
        herd = np.linalg.norm(f[order[:k]].mean(0) - mu)
        rand = np.mean([np.linalg.norm(f[rng.permutation(200)[:k]].mean(0) - mu) for _ in range(50)])
        assert herd < 0.5 * rand


# -- the memory --------------------------------------------------------------------------------------
@pytest.mark.parametrize("selection", ["reservoir_sampling", "herding", "class_balanced_reservoir"])
@pytest.mark.parametrize("budget", [0, 150, 3_000, 8_000, 10**7])
@pytest.mark.parametrize("keep_logits", [False, True])
def test_memory_never_exceeds_its_budget(selection, budget, keep_logits, tmp_path):
    memory = ReplayMemory(token_samples(), budget, selection, seed=2, keep_logits=keep_logits)
    for stats in run_tasks(memory, [[0, 1], [2, 3], [4, 5]]):
        assert stats["bytes"] <= budget
    # the counted bytes are the bytes written: payload files plus float16 logits
    memory.save(tmp_path)
    on_disk = sum(p.stat().st_size for p in tmp_path.iterdir() if p.suffix in (".bin", ".logits"))
    assert on_disk == memory.nbytes <= budget
    if budget == 10**7:
        assert len(memory) == len(memory.samples.labels)  # everything fits
    elif budget >= 3_000:
        assert memory.nbytes > 0.9 * budget  # the bisection fills the budget


def test_bytes_are_measured_by_encoding_not_estimated():
    samples = token_samples()
    memory = ReplayMemory(samples, 5_000, "herding")
    run_tasks(memory, [[0, 1, 2]])
    assert memory.nbytes == sum(len(samples.encode(idx)) for idx in memory.members.values())
    with_logits = ReplayMemory(samples, 5_000, "herding", keep_logits=True)
    run_tasks(with_logits, [[0, 1, 2]])
    assert len(with_logits) < len(memory)  # the logits take room: fewer exemplars fit
    assert with_logits.stats()["logit_bytes"] == 2 * 3 * len(with_logits)


@pytest.mark.parametrize("selection", ["herding", "class_balanced_reservoir"])
def test_class_balanced_selections_stay_balanced(selection):
    memory = ReplayMemory(token_samples(), 4_000, selection, seed=0)
    for stats in run_tasks(memory, [[0, 1], [2, 3], [4, 5]]):
        counts = list(stats["per_class"].values())
        assert max(counts) - min(counts) <= 1, stats["per_class"]


def test_reservoir_sampling_is_a_reservoir_over_the_whole_stream():
    memory = ReplayMemory(token_samples(), 3_000, "reservoir_sampling", seed=5)
    run_tasks(memory, [[0, 1], [2, 3], [4, 5]])
    held = np.concatenate(list(memory.members.values()))
    # the memory is exactly the lowest-priority samples of everything seen
    assert set(held) == set(np.argsort(memory.priority, kind="stable")[:len(held)])


@pytest.mark.parametrize("old, new", [("random", "reservoir_sampling"), ("reservoir", "class_balanced_reservoir")])
def test_an_old_selection_name_is_refused_with_its_new_name(old, new):
    with pytest.raises(ValueError, match=f"^memory.selection={old} is now called {new}: set task.memory.selection={new}$"):
        ReplayMemory(token_samples(), 3_000, old)


def test_old_classes_only_shrink_and_new_classes_are_required():
    memory = ReplayMemory(token_samples(), 3_000, "herding")
    run_tasks(memory, [[0, 1]])
    before = {c: v.copy() for c, v in memory.members.items()}
    memory.update(1, np.flatnonzero(np.isin(memory.samples.labels, [2, 3])), logit_dim=4,
                  features=lambda idx: np.random.default_rng(0).normal(size=(len(idx), 4)))
    for c in (0, 1):  # herding keeps a prefix of the ranking made when the class was learned
        assert np.array_equal(memory.members[c], before[c][:len(memory.members[c])])
    with pytest.raises(ValueError, match="already in the memory"):
        memory.update(2, np.flatnonzero(memory.samples.labels == 0), logit_dim=4, features=lambda idx: np.ones((len(idx), 4)))


@pytest.mark.parametrize("keep_logits", [False, True])
def test_save_load_round_trip_and_replay_decodes_the_stored_bytes(keep_logits, tmp_path):
    samples = token_samples()
    memory = ReplayMemory(samples, 4_000, "class_balanced_reservoir", keep_logits=keep_logits)
    run_tasks(memory, [[0, 1], [2, 3]])
    memory.save(tmp_path)
    again = ReplayMemory(samples, 4_000, "class_balanced_reservoir", keep_logits=keep_logits)
    again.load(tmp_path)
    assert again.stats() == memory.stats() and again.seen == memory.seen
    for c in memory.members:
        assert np.array_equal(again.members[c], memory.members[c])
    replay = again.replay_set()
    held = np.concatenate([memory.members[c] for c in sorted(memory.members)])
    assert torch.equal(replay["inputs"], torch.from_numpy(samples.ids[held]))
    assert torch.equal(replay["labels"], torch.from_numpy(samples.labels[held]))
    if keep_logits:
        assert replay["logits"].shape == (len(held), 4)
        assert set(replay["logit_dims"].tolist()) == {2, 4}  # each class's logits: the classes seen at its task
    (tmp_path / f"class_{min(memory.members)}.bin").write_bytes(b"SCHK" + b"\0" * 40)
    with pytest.raises(ValueError, match=f"class_{min(memory.members)}.bin is corrupt"):
        ReplayMemory(samples, 4_000, "class_balanced_reservoir", keep_logits=keep_logits).load(tmp_path)
    with pytest.raises(ValueError, match="holds a class_balanced_reservoir memory .* uses herding"):
        ReplayMemory(samples, 4_000, "herding", keep_logits=keep_logits).load(tmp_path)
    (tmp_path / "memory.json").unlink()
    with pytest.raises(FileNotFoundError, match="memory.json is missing"):
        ReplayMemory(samples, 4_000, "class_balanced_reservoir", keep_logits=keep_logits).load(tmp_path)


def test_jpeg_memory_holds_the_files_bytes_and_decodes_like_the_loader(tmp_path):
    samples = jpeg_samples(tmp_path)
    idx = np.array([0, 3, 7])
    payload = samples.encode(idx)
    files = sum((tmp_path / f"c{i // 6}_{i % 6}.jpg").stat().st_size for i in idx)
    assert files < len(payload) < files + 120  # the files plus a small header, labels and keys
    images, labels, keys = samples.decode(payload)
    assert np.array_equal(keys, idx) and np.array_equal(labels, samples.labels[idx])
    assert torch.equal(images[1], torch.from_numpy(load_image(samples.records[3], 16)))
    memory = ReplayMemory(samples, 5_000, "herding")
    for stats in run_tasks(memory, [[0, 1], [2, 3], [4, 5]]):
        assert stats["bytes"] <= 5_000 and stats["bytes_per_exemplar"] > 300


def test_jpeg_quality_reencodes_smaller(tmp_path):
    original, low = jpeg_samples(tmp_path), jpeg_samples(tmp_path)
    low.quality = 10
    idx = np.arange(12)
    assert len(low.encode(idx)) < 0.9 * len(original.encode(idx))  # 16 px: the JPEG headers dominate
    images, _, _ = low.decode(low.encode(idx))
    assert images.shape == (12, 3, 16, 16)


# -- the task ------------------------------------------------------------------------------------
def continual_task(method: str, num_classes: int = 6):
    from seit.tasks.continual import ContinualTask

    model = {"_target_": "seit.models.vit.TokenViT", "name": "t", "input": "tokens", "embed_dim": 32, "depth": 1,
             "num_heads": 2}
    optim = {"_target_": "seit.tasks.optim.create_optimizer", "_partial_": True, "lr": 1e-3, "weight_decay": 0.0}
    data = {"kind": "tokens", "num_classes": num_classes, "input_grid": 8, "batch_size": 8, "codebook_size": 64,
            "codebook_dim": 4}
    task = ContinualTask(model=model, optim=optim, aug={"crop": 6}, data=data,
                         class_order=[5, 4, 3, 2, 1, 0], method=method, replay_batch=4,
                         distill={"temperature": 2.0, "weight": 1.0}, derpp={"alpha": 0.3, "beta": 0.5})
    task.load_codebook(torch.randn(64, 4))
    return task


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
@pytest.mark.parametrize("method", ["er", "distill", "derpp"])
def test_future_classes_get_no_gradient_and_replay_is_counted(method):
    task = continual_task(method)
    # task 1 of 3: slots 0-3 seen (classes 5, 4, 3, 2); the memory holds classes 5 and 4
    replay = {"inputs": torch.randint(0, 64, (10, 8, 8), dtype=torch.int64), "labels": torch.tensor([5, 4] * 5)}
    if method == "derpp":
        replay.update(logits=torch.randn(10, 2), logit_dims=torch.full((10,), 2))
    task.begin_task(seen=4, old=2, replay=replay)
    assert (task.teacher is not None) == (method == "distill")
    batch = {"ids": torch.randint(0, 64, (8, 8, 8), dtype=torch.int64), "label": torch.tensor([3, 2] * 4)}
    loss = task.training_step(batch, 0)
    loss.backward()
    head = task.model.vit.head
    assert head.weight.grad[4:].abs().sum() == 0 and head.bias.grad[4:].abs().sum() == 0
    assert head.weight.grad[:4].abs().sum() > 0
    counts = task.train_counts.tolist()
    assert counts[0] == counts[1] == 0 and counts[2] == counts[3] == 4 and counts[4] + counts[5] == 4


def test_evaluation_scores_only_the_seen_slots():
    task = continual_task("er")
    task.begin_task(seen=2, old=0, replay=None)
    with torch.no_grad():  # make the unseen slots win every argmax: they must not count
        task.model.vit.head.bias[2:] += 1e3
    task.on_validation_epoch_start()
    ids = torch.randint(0, 64, (6, 8, 8), dtype=torch.int64)
    task.validation_step({"ids": ids, "label": torch.tensor([5, 4, 5, 4, 5, 4])}, 0)
    predicted = task.model(task.model.embed(ids)[..., 1:7, 1:7])[:, :2].argmax(1)
    assert task.eval_total[[5, 4]].tolist() == [3, 3]
    assert task.eval_correct.sum() == int((predicted == torch.tensor([0, 1, 0, 1, 0, 1])).sum())
