import pytest
import torch

from seit.augment.crop import center_crop, crop_at, random_crop
from seit.models.stem import StemAdaptor
from seit.models.vit import TokenViT


@pytest.mark.parametrize("grid,expected", [(28, 14), (14, 7), (32, 16), (15, 7), (8, 4)])
def test_stem_adaptor_halves_any_grid(grid, expected):
    stem = StemAdaptor(img_size=grid, in_chans=32, embed_dim=64)
    out = stem(torch.randn(2, 32, grid, grid))
    assert out.shape == (2, expected * expected, 64)
    assert stem.num_patches == expected * expected
    assert (stem.proj.kernel_size, stem.proj.stride, stem.proj.padding) == ((4, 4), (2, 2), (1, 1))


@pytest.mark.parametrize("crop", [28, 14, 9])
def test_token_vit_end_to_end_shapes(crop):
    model = TokenViT(input="tokens", input_size=crop, num_classes=7, embed_dim=32, depth=2, num_heads=2,
                     codebook_size=391, codebook_dim=32)
    model.embed.load_codebook(torch.randn(391, 32))
    ids = torch.randint(0, 391, (3, 32, 32), dtype=torch.int32).to(torch.uint16)
    x = model.embed(ids)
    assert x.shape == (3, 32, 32, 32)
    assert model(center_crop(x, crop)).shape == (3, 7)
    assert model.features(center_crop(x, crop)).shape == (3, 32)
    assert not any(p is model.embed.codebook for p in model.parameters())  # frozen


def test_codebook_lookup_matches_rows():
    model = TokenViT(input="tokens", input_size=4, num_classes=2, embed_dim=16, depth=1, num_heads=2,
                     codebook_size=10, codebook_dim=3)
    cb = torch.randn(10, 3)
    model.embed.load_codebook(cb)
    ids = torch.tensor([[[1, 9], [0, 4]]])
    assert torch.equal(model.embed(ids)[0, :, 1, 0], cb[0])
    with pytest.raises(ValueError, match="shape"):
        model.embed.load_codebook(torch.randn(11, 3))


def test_pixel_vit_shapes():
    model = TokenViT(input="pixels", input_size=56, num_classes=5, embed_dim=32, depth=1, num_heads=2, patch_size=8)
    x = model.embed(torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8))
    assert model(center_crop(x, 56)).shape == (2, 5)


def test_crops_pick_the_right_window():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    out = crop_at(x, torch.tensor([0, 2]), torch.tensor([1, 3]), 3)
    assert torch.equal(out[0], x[0, :, 0:3, 1:4]) and torch.equal(out[1], x[1, :, 2:5, 3:6])
    assert random_crop(x, 4).shape == (2, 1, 4, 4)
    assert torch.equal(center_crop(x, 4), x[..., 1:5, 1:5])
    with pytest.raises(ValueError, match="larger"):
        random_crop(x, 7)
