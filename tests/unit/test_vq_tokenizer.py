import pytest
import torch

from conftest import as_before_codebook_dim_rename
from seit.tokenizers import VQTokenizer, load_tokenizer
from seit.tokenizers.vq_model import CosineQuantizer, VQModel

TINY = {"ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "codebook_size": 16, "codebook_dim": 4}


def test_shapes_and_downsampling():
    model = VQModel(**TINY)
    x = torch.rand(2, 3, 32, 32)
    recon, ids, stats = model(x)
    assert recon.shape == x.shape and ids.shape == (2, 8, 8) and model.downsample == 4
    assert int(ids.max()) < 16 and 1 <= float(stats["perplexity"]) <= 16 and 0 < float(stats["usage"]) <= 1
    recon.sum().backward()  # straight-through: the encoder gets gradients
    assert model.encoder.net[0].weight.grad is not None


def test_codes_stay_unit_norm_and_dead_codes_restart():
    q = CosineQuantizer(8, 3, decay=0.5, dead_threshold=0.5)
    z = torch.randn(4, 3, 5, 5)
    z[:, :, :, :] = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)  # every vector the same: one code wins
    before = q.embed.clone()
    for _ in range(5):
        q(z)
    assert torch.allclose(q.embed.norm(dim=1), torch.ones(8), atol=1e-5)
    assert not torch.equal(before, q.embed)
    used = q.lookup(z).unique()
    assert torch.allclose(q.embed[used], torch.tensor([[1.0, 0.0, 0.0]]), atol=1e-4)
    assert (q.usage > 0).all()  # restarted codes were given a fresh share


def test_lookup_is_cosine_nearest():
    q = CosineQuantizer(3, 2)
    q.embed.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    z = torch.tensor([[10.0, 1.0], [0.1, 5.0], [-0.2, 0.1]]).T.reshape(1, 2, 1, 3)
    assert q.lookup(z).tolist() == [[[0, 1, 2]]]


def test_tokenizer_save_load_round_trip(tmp_path):
    tok = VQTokenizer(VQModel(**TINY), image_size=32)
    tok.save(tmp_path / "vq.safetensors")
    loaded = load_tokenizer(tmp_path / "vq.safetensors")
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(loaded.encode(x), tok.encode(x)) and loaded.fingerprint == tok.fingerprint
    assert loaded.decode(loaded.encode(x)).shape == x.shape and loaded.grid == (8, 8)
    with pytest.raises(ValueError, match="multiple"):
        tok.encode(torch.rand(1, 3, 30, 30))


def test_compaction_keeps_encodings_and_saves_the_map(tmp_path):
    tok = VQTokenizer(VQModel(**TINY), image_size=32)
    x = torch.rand(2, 3, 32, 32)
    ids = tok.encode(x)
    counts = torch.bincount(ids.reshape(-1), minlength=16)
    small = tok.compacted(counts)
    assert small.codebook_size == int((counts > 0).sum())
    assert torch.equal(small.encode(x), small.compaction[ids])
    assert torch.allclose(small.decode(small.encode(x)), tok.decode(ids))
    small.save(tmp_path / "s.safetensors")
    again = load_tokenizer(tmp_path / "s.safetensors")
    assert torch.equal(again.compaction, small.compaction) and again.codebook_size == small.codebook_size


PATCH = {"arch": "patch", "patch": 4, "width": 16, "depth": 1, "refine_ch": 4, "codebook_size": 16, "codebook_dim": 4}


def test_patch_arch_grid_gradients_and_round_trip(tmp_path):
    model = VQModel(**PATCH)
    x = torch.rand(2, 3, 16, 24)
    recon, ids, _ = model(x)
    assert model.downsample == 4 and ids.shape == (2, 4, 6) and recon.shape == x.shape
    recon.sum().backward()
    assert model.encoder.net[1].weight.grad.abs().sum() > 0  # straight-through reaches the patch projection
    tok = VQTokenizer(model, image_size=16)
    small = tok.compacted(torch.bincount(tok.encode(x).reshape(-1), minlength=16))
    small.save(tmp_path / "p.safetensors")
    loaded = load_tokenizer(tmp_path / "p.safetensors")
    assert loaded.model.config["arch"] == "patch" and torch.equal(loaded.encode(x), small.encode(x))
    assert torch.allclose(loaded.decode(loaded.encode(x)), small.decode(small.encode(x)))


def test_arch_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown VQ arch"):
        VQModel(arch="vit", patch=4)
    with pytest.raises(ValueError, match=r"missing \['depth'\], unknown \['ch'\]"):
        VQModel(arch="patch", patch=4, width=8, ch=8)


def test_an_existing_dataset_from_another_tokenizer_is_refused(tmp_path):
    from omegaconf import OmegaConf

    from conftest import write_token_dataset
    from seit.data.dataset_info import DatasetError, TokenDatasetInfo
    from seit.pipelines.tokenize import prepare_token_dataset

    root = tmp_path / "ds"
    write_token_dataset(root, counts={"train": [4]}, grid=(8, 8), codebook_size=16)
    matching, other = VQTokenizer(VQModel(**TINY), 32), VQTokenizer(VQModel(**TINY), 32)
    matching.model.quantizer.embed.copy_(TokenDatasetInfo.open(root).load_codebook())
    matching.save(tmp_path / "matching.safetensors")
    other.save(tmp_path / "other.safetensors")
    for name, margin, ok in (("matching", 0.0, True), ("other", 0.0, False), ("matching", 0.1, False)):
        cfg = OmegaConf.create({"data": {"root": str(root), "build": {"source": "unused"}},
                                "tokenizer": {"checkpoint": str(tmp_path / f"{name}.safetensors"),
                                              "copy_margin": margin}})
        if ok:
            prepare_token_dataset(cfg)
        else:
            with pytest.raises(DatasetError, match="another data.root"):  # other ids: another dataset
                prepare_token_dataset(cfg)


def test_copy_margin_trades_exactness_for_repeats():
    q = CosineQuantizer(32, 4)
    z = torch.randn(3, 4, 6, 7)
    plain = q.lookup(z)
    assert torch.equal(q.lookup(z, 0.0), plain)
    everything = q.lookup(z, 2.0)  # cosines differ by at most 2: every token copies
    assert (everything == plain[:, :1, :1]).all()

    def repeats(ids):
        return int((ids[:, 1:] == ids[:, :-1]).sum() + (ids[:, :, 1:] == ids[:, :, :-1]).sum())

    some = q.lookup(z, 0.3)
    assert repeats(plain) < repeats(some) < repeats(everything)
    sims = torch.einsum("bdhw,kd->bhwk", torch.nn.functional.normalize(z, dim=1), q.embed)
    chosen = sims.gather(-1, some[..., None])[..., 0]
    assert (chosen >= sims.max(-1).values - 0.3 - 1e-6).all()  # never worse than the margin allows
    changed = some != plain
    up_or_left = torch.zeros_like(changed)
    up_or_left[:, 1:] |= some[:, 1:] == some[:, :-1]
    up_or_left[:, :, 1:] |= some[:, :, 1:] == some[:, :, :-1]
    assert up_or_left[changed].all()  # a changed token always repeats a neighbour


def test_a_tokenizer_saved_before_the_codebook_dim_rename_loads(tmp_path):
    tok = VQTokenizer(VQModel(**TINY), image_size=32)
    path = tmp_path / "old.safetensors"
    tok.save(path)
    config = as_before_codebook_dim_rename(path)
    assert config["codebook_dim"] == 4 and "embed_dim" not in config
    loaded = load_tokenizer(path)
    x = torch.rand(2, 3, 32, 32)
    assert loaded.model.config == tok.model.config and loaded.codebook_dim == 4
    assert torch.equal(loaded.encode(x), tok.encode(x)) and loaded.fingerprint == tok.fingerprint
    # a tokenizer training checkpoint written before the rename holds embed_dim in its hyper-parameters
    legacy = {("embed_dim" if k == "codebook_dim" else k): v for k, v in TINY.items()}
    assert VQModel(**legacy).config == VQModel(**TINY).config
