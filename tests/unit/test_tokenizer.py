import pytest
import torch

from seit.tokenizers import PatchKMeansTokenizer, load_tokenizer


def _images(n=24, size=32, seed=0):
    """Smooth random images: a few blobs of colour, so patches have structure to learn."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def tokenizer():
    return PatchKMeansTokenizer.fit(_images(), patch_size=4, codebook_size=64, codebook_dim=8, max_patches=5000,
                                    iters=10, seed=0)


def test_encode_decode_shapes_and_grid(tokenizer):
    ids = tokenizer.encode(_images(3, seed=1))
    assert ids.shape == (3, 8, 8) and tokenizer.grid == (8, 8)
    assert int(ids.min()) >= 0 and int(ids.max()) < 64
    assert tokenizer.decode(ids).shape == (3, 3, 32, 32)


def test_reconstruction_beats_the_mean_image(tokenizer):
    x = _images(8, seed=2)  # held out
    err = (tokenizer.decode(tokenizer.encode(x)) - x).pow(2).mean()
    baseline = (x - x.mean(dim=(0, 2, 3), keepdim=True)).pow(2).mean()
    assert err < 0.25 * baseline


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "t.safetensors")
    loaded = load_tokenizer(tmp_path / "t.safetensors")
    x = _images(4, seed=3)
    assert torch.equal(loaded.encode(x), tokenizer.encode(x))
    assert loaded.fingerprint == tokenizer.fingerprint


def test_codebook_is_stored_at_float16_precision(tokenizer):
    cb = tokenizer.codebook
    assert torch.equal(cb, cb.half().float())


def test_other_image_sizes_and_missing_checkpoint(tokenizer, tmp_path):
    p = tokenizer.downsample
    assert tokenizer.encode(torch.rand(2, 3, 4 * p, 6 * p)).shape == (2, 4, 6)  # any multiple of the patch
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        tokenizer.encode(torch.rand(1, 3, 4 * p + 1, 4 * p))
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope.safetensors")


def test_compaction_drops_unused_codes_and_keeps_encodings(tokenizer):
    x = _images(6, seed=4)
    ids = tokenizer.encode(x)
    counts = torch.bincount(ids.reshape(-1), minlength=tokenizer.codebook_size)
    small = tokenizer.compacted(counts)
    assert small.codebook_size == int((counts > 0).sum()) < tokenizer.codebook_size
    assert torch.equal(small.encode(x), small.compaction[ids])  # same codes, renumbered
    assert torch.equal(small.codebook, tokenizer.codebook[counts > 0])


def test_synonyms_are_nearest_other_codes():
    from seit.tokenizers.codebook_tools import synonyms

    cb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    table = synonyms(cb, 2)
    assert table[0].tolist() == [1, 2] and table[3].tolist() == [2, 1]
    with pytest.raises(ValueError):
        synonyms(cb, 4)
