"""The device-side augmentation library: exactness of Token-RRC, seeding, label mass, safety."""

import pytest
import torch
import torch.nn.functional as F

from seit.augment.color import color_adapt, emb_noise
from seit.augment.eda import square_swap, synonym_replace, token_eda
from seit.augment.mix import mix_batch
from seit.augment.pipeline import AugConfig, augment_pixels, augment_tokens, color_choice, eval_view
from seit.augment.rrc import resized_crop, rrc_boxes, token_rrc

K, D = 40, 6


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_rrc_matches_interpolate_per_sample():
    x = torch.randn(16, 3, 32, 32)
    boxes = rrc_boxes(16, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), gen())
    out = resized_crop(x, boxes, 28)
    for i, (t, l, h, w) in enumerate(boxes.tolist()):
        ref = F.interpolate(x[i : i + 1, :, t : t + h, l : l + w], size=(28, 28), mode="bicubic", align_corners=False)
        assert torch.allclose(out[i], ref[0], atol=1e-4)


def test_rrc_on_embeddings_equals_rrc_on_one_hot():
    """Resizing is linear: RRC of the D-channel embedding map == lookup of the RRC'd one-hot map."""
    ids = torch.randint(0, K, (8, 32, 32), generator=gen(1))
    codebook = torch.randn(K, D, dtype=torch.float64)
    boxes = rrc_boxes(8, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), gen(2))
    one_hot = F.one_hot(ids, K).permute(0, 3, 1, 2).double()
    via_one_hot = torch.einsum("bkhw,kd->bdhw", resized_crop(one_hot, boxes, 28), codebook)
    via_embedding = resized_crop(F.embedding(ids, codebook).permute(0, 3, 1, 2), boxes, 28)
    assert torch.allclose(via_one_hot, via_embedding, atol=1e-10)


def test_rrc_boxes_respect_scale_ratio_and_bounds():
    boxes = rrc_boxes(4000, 32, 32, (0.3, 0.6), (0.5, 2.0), gen(3))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = (h * w).float() / 1024
    assert area.min() > 0.25 and area.max() < 0.67  # rounding of h and w moves the area a little
    assert (w.float() / h).min() > 0.4 and (w.float() / h).max() < 2.5
    impossible = rrc_boxes(5, 32, 32, (2.0, 3.0), (1.0, 1.0), gen())  # no draw fits: centred fallback
    assert impossible.tolist() == [[0, 0, 32, 32]] * 5


def test_token_rrc_is_seeded():
    x = torch.randn(4, D, 32, 32)
    a, b, c = token_rrc(x, 28, generator=gen(5)), token_rrc(x, 28, generator=gen(5)), token_rrc(x, 28, generator=gen(6))
    assert a.shape == (4, D, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)


def test_synonym_replace_uses_the_table_and_the_mask():
    ids = torch.randint(0, K, (4, 16, 16), generator=gen())
    synonyms = (torch.arange(K)[:, None] + torch.arange(1, 4)[None]) % K  # code k -> k+1, k+2, k+3
    out = synonym_replace(ids, synonyms, 0.5, torch.tensor([True, True, False, True]), gen())
    assert torch.equal(out[2], ids[2])
    changed = out != ids
    assert 0.3 < changed[[0, 1, 3]].float().mean() < 0.7
    delta = (out - ids) % K
    assert ((delta >= 1) & (delta <= 3))[changed].all()


def test_square_swap_permutes_the_grid():
    ids = torch.arange(8 * 32 * 32).reshape(8, 32, 32)
    out = square_swap(ids, 0.25, torch.ones(8, dtype=torch.bool), gen(7))
    assert torch.equal(out.flatten(1).sort(1).values, ids.flatten(1))  # nothing lost, nothing doubled
    assert (out != ids).any()
    kept = square_swap(ids, 0.25, torch.zeros(8, dtype=torch.bool), gen(7))
    assert torch.equal(kept, ids)


def test_eda_choice_rates_and_missing_synonyms():
    ids = torch.randint(0, K, (2000, 8, 8), generator=gen())
    synonyms = torch.randint(0, K, (K, 5), generator=gen(1))
    out = token_eda(ids, synonyms, 0.25, 0.0, 1.0, 0.25, gen(2))
    touched = (out != ids).flatten(1).any(1).float().mean()
    assert 0.2 < touched < 0.3
    with pytest.raises(ValueError, match="synonym table"):
        token_eda(ids, None, 0.25, 0.25, 0.25, 0.25, gen())


def test_cutmix_conserves_label_mass():
    """Targets sum to 1, and each target weight is exactly the share of the map from that sample."""
    b, c = 6, 10
    labels = torch.arange(b)
    x = labels.float()[:, None, None, None].expand(b, 1, 28, 28).clone()  # each map holds its label
    for seed in range(20):
        mixed, targets = mix_batch(x, labels, c, cutmix_alpha=1.0, smoothing=0.0, generator=gen(seed))
        assert torch.allclose(targets.sum(1), torch.ones(b))
        share_own = (mixed == x).float().mean((1, 2, 3))
        assert torch.allclose(targets[torch.arange(b), labels], share_own, atol=1e-6)
    _, smoothed = mix_batch(x, labels, c, mixup_alpha=0.8, smoothing=0.1, generator=gen())
    assert torch.allclose(smoothed.sum(1), torch.ones(b)) and (smoothed > 0).all()


def test_color_adapt_is_safe_on_constant_maps_and_swaps_statistics():
    const = torch.full((4, 3, 7, 7), 2.5)
    out = color_adapt(const, torch.ones(4, dtype=torch.bool))
    assert torch.isfinite(out).all() and torch.allclose(out, const)
    x = torch.randn(4, 3, 7, 7) * torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None, None, None] + 5
    y = color_adapt(x, torch.tensor([True, True, False, True]))
    assert torch.equal(y[2], x[2])
    assert torch.allclose(y[0].mean((1, 2)), x[3].mean((1, 2)), atol=1e-4)
    assert torch.allclose(y[0].std((1, 2), unbiased=False), x[3].std((1, 2), unbiased=False), atol=1e-3)


def test_noise_only_where_applied():
    x = torch.zeros(4, 3, 5, 5)
    y = emb_noise(x, torch.tensor([True, False, True, False]), generator=gen())
    assert (y[[0, 2]] != 0).all() and (y[[1, 3]] == 0).all()


def full_recipe():
    return AugConfig.from_dict({"crop": 28, "rrc": {"enabled": True},
                                "eda": {"replace_prob": 0.25, "swap_prob": 0.25},
                                "noise": {"prob": 0.5}, "color_adapt": {"prob": 0.25},
                                "mix": {"cutmix_alpha": 1.0}})


def test_full_token_recipe_shapes_and_seeding():
    ids = torch.randint(0, K, (8, 32, 32), generator=gen())
    labels = torch.randint(0, 5, (8,), generator=gen(1))
    codebook = torch.randn(K, D)
    synonyms = torch.randint(0, K, (K, 5), generator=gen(2))

    def embed(i):
        return F.embedding(i.long(), codebook).permute(0, 3, 1, 2)

    def run(seed):
        return augment_tokens(ids, labels, embed, full_recipe(), 5, 0.1, synonyms, gen(seed))

    (x, t), (x2, t2), (x3, _) = run(0), run(0), run(1)
    assert x.shape == (8, D, 28, 28) and t.shape == (8, 5) and torch.allclose(t.sum(1), torch.ones(8))
    assert torch.equal(x, x2) and torch.equal(t, t2) and not torch.equal(x, x3)
    assert eval_view(embed(ids), full_recipe()).shape == (8, D, 28, 28)
    px, pt = augment_pixels(torch.randint(0, 255, (8, 3, 32, 32)).float(), labels, lambda v: v,
                            AugConfig.from_dict({"crop": 24, "hflip": 0.5, "rrc": {"enabled": True}}), 5, 0.1, gen())
    assert px.shape == (8, 3, 24, 24) and pt.shape == (8, 5)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown aug keys"):
        AugConfig.from_dict({"crop": 28, "cutmix": 1.0})
    with pytest.raises(ValueError, match="unknown aug.noise keys"):
        AugConfig.from_dict({"noise": {"p": 0.5}})
    with pytest.raises(ValueError, match="> 1"):
        color_choice(torch.zeros(2, 3, 4, 4), AugConfig.from_dict({"noise": {"prob": 0.8}, "color_adapt": {"prob": 0.5}}),
                     gen())


def test_tokenadapt_half_batch_and_frozen_loading(tmp_path):
    from seit.models.tokenadapt import TokenAdapt
    from seit.models.export import load_tokenadapt, save_tokenadapt

    codebook = torch.randn(K, D)
    adapt = TokenAdapt(codebook, width=32, heads=2)
    save_tokenadapt(adapt, tmp_path / "ta.safetensors", "abc")
    loaded = load_tokenadapt(tmp_path / "ta.safetensors", "abc")
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(adapt.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="trained on codebook"):
        load_tokenadapt(tmp_path / "ta.safetensors", "another")

    ids = torch.randint(0, K, (6, 16, 16), generator=gen())

    def embed(i):
        return F.embedding(i.long(), codebook).permute(0, 3, 1, 2)

    cfg = AugConfig.from_dict({"crop": 14, "rrc": {"enabled": True}, "tokenadapt": {"share": 0.5}})
    x, t = augment_tokens(ids, torch.arange(6) % 3, embed, cfg, 3, 0.1, None, gen(), adapt=loaded)
    assert x.shape == (6, D, 14, 14) and t.shape == (6, 3)
    snapped = (x[:3].permute(0, 2, 3, 1)[..., None, :] == codebook).all(-1).any(-1)
    assert snapped.all()  # the TokenAdapt half holds codebook vectors (ids from g's argmax)


def test_relative_noise_follows_each_channels_spread():
    spread = torch.tensor([4.0, 1.0, 0.01])[None, :, None, None]
    x = torch.randn(64, 3, 8, 8, generator=gen()) * spread
    cfg = AugConfig.from_dict({"noise": {"prob": 1.0, "scale": 0.0, "std": 0.5, "relative": True}})
    small = color_choice(x, cfg, gen(3)) - x
    big = color_choice(10 * x, cfg, gen(3)) - 10 * x
    assert torch.allclose(big, 10 * small, atol=1e-4)
    ratio = small.std((0, 2, 3)) / x.std((0, 2, 3))
    assert torch.allclose(ratio, torch.full((3,), 0.5), atol=0.02)
