"""Where and in what precision task=tokenize encodes: device names, bf16, and the plan that records it."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_image_folder
from seit.pipelines import tokenize as tk
from seit.tokenizers import PatchKMeansTokenizer, VQTokenizer
from seit.tokenizers.base import ImageEncoder, encode_device, encode_precision
from seit.tokenizers.vq_model import VQModel

TINY = {"ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "codebook_size": 64, "codebook_dim": 8}


def _vq(seed: int = 0) -> VQTokenizer:
    torch.manual_seed(seed)
    return VQTokenizer(VQModel(**TINY), image_size=32)


def test_device_names():
    assert encode_device("cpu") == torch.device("cpu")
    assert encode_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert encode_device(None) == encode_device("auto")
    with pytest.raises(ValueError, match="tokenizer.device=tpu9 is not a device"):
        encode_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^tokenizer.device=cuda: no CUDA device here"):
            encode_device("cuda", local_rank=1)
        with pytest.raises(ValueError, match="tokenizer.device=cuda:3: no CUDA device here"):
            encode_device("cuda:3")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="tokenizer.device=mps: the MPS backend is not available"):
            encode_device("mps")


def test_precision_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    kmeans = PatchKMeansTokenizer.__new__(PatchKMeansTokenizer)
    assert encode_precision("auto", _vq(), cpu) == "fp32"
    assert encode_precision("auto", _vq(), cuda) == "bf16"  # a learned encoder on a GPU
    assert encode_precision("auto", kmeans, cuda) == "fp32"  # a projection and a code search
    assert encode_precision("auto", _vq(), cuda, planned="fp32") == "fp32"  # a resumed build keeps its precision
    assert encode_precision("bf16", _vq(), cpu) == "bf16"
    with pytest.raises(ValueError, match="tokenizer.precision=bf16: the patch_kmeans tokenizer encodes in fp32 only"):
        encode_precision("bf16", kmeans, cuda)
    with pytest.raises(ValueError, match=r"tokenizer.precision=fp16 must be one of \('auto', 'fp32', 'bf16'\)"):
        encode_precision("fp16", _vq(), cpu)


def test_bf16_encodes_with_the_code_search_in_fp32():
    """bf16 autocast runs the convolutions in bf16; the nearest-code search must not be: it would
    round the cosines to 8 bits of mantissa and tie many codes."""
    tok = _vq()
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    fp32 = ImageEncoder(tok, torch.device("cpu"), precision="fp32")(images)
    bf16 = ImageEncoder(tok, torch.device("cpu"), precision="bf16")(images)
    assert bf16.dtype == torch.int64 and bf16.shape == fp32.shape == (8, 8, 8)
    agree = (bf16 == fp32).float().mean().item()
    assert 0.5 < agree < 1.0  # bf16 convolutions move some latents across a boundary, most stay

    seen = []
    real = tok.model.quantizer.lookup
    tok.model.quantizer.lookup = lambda z, margin=0.0: seen.append((z.dtype, torch.is_autocast_enabled("cpu"))) or real(z, margin)
    ImageEncoder(tok, torch.device("cpu"), precision="bf16")(images)
    assert seen == [(torch.float32, False)]


def _cfg(tmp_path, **tokenizer):
    images = make_image_folder(tmp_path / "images", classes=2, train=6, val=2)
    return OmegaConf.create({
        "data": {"root": str(tmp_path / "ds"), "build": {
            "source": str(images), "shard_size": 4, "chunk_size": 2, "codec": "zstd-planes", "codec_fit_samples": 8,
            "shuffle_seed": 0, "workers": 0, "skip_bad_images": False, "synonyms_k": 0, "storage_report": False,
            "storage_report_samples": 8, "parity": 0.0, "rank_stall_s": 60}},
        "paths": {"cache_dir": str(tmp_path / "cache")},
        "tokenizer": {"kind": "patch_kmeans", "checkpoint": None, "image_size": 16, "patch_size": 4, "codebook_size": 8,
                      "codebook_dim": 4, "fit_images": 12, "fit_patches": 200, "fit_iters": 5, "seed": 0,
                      "compact": False, "device": "cpu", "precision": "auto", **tokenizer}})


def test_the_plan_records_the_precision_and_a_resume_keeps_it(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    real = tk.run_shards

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tk, "run_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):  # interrupted after planning
        tk.tokenize(cfg, rank=0, world=1)
    plan = json.loads((tmp_path / "ds" / ".progress" / "plan.json").read_text())
    assert plan["tokenizer"]["precision"] == "fp32"

    plan["tokenizer"]["precision"] = "bf16"  # as if started in bf16 on a GPU: an explicit fp32 resume is refused
    (tmp_path / "ds" / ".progress" / "plan.json").write_text(json.dumps(plan))
    cfg.tokenizer.precision = "fp32"
    with pytest.raises(Exception, match=r"tokenizer.precision=fp32 \(built with bf16\)"):
        tk.tokenize(cfg, rank=0, world=1)
    plan["tokenizer"]["precision"] = "fp32"
    (tmp_path / "ds" / ".progress" / "plan.json").write_text(json.dumps(plan))

    cfg.tokenizer.precision = "auto"
    monkeypatch.setattr(tk, "run_shards", real)
    meta = tk.tokenize(cfg, rank=0, world=1)
    assert meta["build"]["tokenizer"]["precision"] == "fp32" and meta["tokenizer"]["device"] == "cpu"
    assert meta["num_samples"] == 16
    # a finished dataset answers "nothing to do" to auto and to the precision it was built in
    assert tk.tokenize(cfg, rank=0, world=1)["num_samples"] == 16
    cfg.tokenizer.precision = "fp32"
    assert tk.tokenize(cfg, rank=0, world=1)["num_samples"] == 16


def test_two_ranks_in_threads_write_the_bytes_of_one_process(tmp_path):
    """Rank 1 waits for rank 0's go-ahead, each writes its shards (i % 2), rank 0 gathers: same shards."""
    one = _cfg(tmp_path / "a")
    meta = tk.tokenize(one, rank=0, world=1)
    two = _cfg(tmp_path / "b")
    two.tokenizer.checkpoint = str(tmp_path / "a" / "ds.tokenizer.safetensors")
    follower = {}
    thread = threading.Thread(target=lambda: follower.update(out=tk.tokenize(two, rank=1, world=2)))
    thread.start()
    meta2 = tk.tokenize(two, rank=0, world=2)
    thread.join(60)
    assert follower == {"out": {}}
    assert [(s["name"], s["sha256"]) for s in meta2["shards"]] == [(s["name"], s["sha256"]) for s in meta["shards"]]
    assert len(meta["shards"]) == 4 and not (tmp_path / "b" / "ds" / ".progress").exists()


def test_rank_zero_names_the_missing_rank_and_tells_the_others(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.data.build.rank_stall_s = 0.5
    with pytest.raises(TimeoutError, match=r"no shard finished in 0s .* 2 of 4 are missing \(train-000001.tar, …\) "
                                           r"from rank\(s\) \[1\]: a rank died or hangs; rerun"):
        tk.tokenize(cfg, rank=0, world=2)
    launch = json.loads((tmp_path / ".ds.launch.json").read_text())
    assert "no shard finished" in launch["error"]  # a rank 1 that starts late stops with rank 0's reason
    with pytest.raises(RuntimeError, match="rank 0 failed: no shard finished"):
        tk.tokenize(cfg, rank=1, world=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_absent_device_or_a_bf16_refusal_comes_before_any_work(tmp_path):
    for key, value, message in (("device", "cuda", "tokenizer.device=cuda: no CUDA device here"),
                                ("precision", "bf16", "tokenizer.precision=bf16: the patch_kmeans tokenizer")):
        cfg = _cfg(tmp_path / key, **{key: value})
        with pytest.raises(ValueError, match=message):
            tk.tokenize(cfg, rank=0, world=1)
        assert not (tmp_path / key / "ds").exists() and not (tmp_path / key / "ds.tokenizer.safetensors").exists()
