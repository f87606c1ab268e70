"""SeiT++ masked token modeling: shapes, masks, the loss, and the hand-over to fine-tuning."""

from __future__ import annotations

import math

import pytest
import torch

from seit.models.mtm import MaskedTokenModel, masked_token_loss, random_masks, truncated_normal
from seit.models.vit import TokenViT
from seit.models.export import load_encoder_into, save_mtm
from seit.tasks.classification import ClassificationTask
from seit.tasks.optim import scaled_lr

K, D, GRID = 64, 8, 8


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mtm(**kw) -> MaskedTokenModel:
    torch.manual_seed(0)
    args = dict(codebook_size=K, grid=GRID, codebook_dim=D, embed_dim=32, depth=2, num_heads=2, decoder_dim=16,
                decoder_depth=1, decoder_heads=2, dropout=0.0, decoder_dropout=0.0)
    return MaskedTokenModel(**{**args, **kw}).eval()


def classifier(**kw) -> TokenViT:
    args = dict(input="tokens", input_size=GRID, num_classes=5, embed_dim=32, depth=2, num_heads=2,
                codebook_size=K, codebook_dim=D, embedding="learned")
    return TokenViT(**{**args, **kw})


def test_encoder_and_decoder_shapes():
    model, ids = mtm(), torch.randint(0, K, (3, GRID, GRID), generator=gen())
    masked, dropped = random_masks(3, 16, 0.7, 0.4, gen())
    encoded, index = model.encode(ids, masked, dropped)
    assert encoded.shape == (3, 1 + 16 - math.ceil(16 * 0.4), 32) and index.shape == (3, 16 - 7)
    assert model.decode(encoded, index, masked).shape == (3, GRID, GRID, K)


def test_masks_nest_and_count():
    masked, dropped = random_masks(50, 196, 0.55, 0.4, gen())
    assert (masked.sum(1) == math.ceil(196 * 0.55)).all() and (dropped.sum(1) == math.ceil(196 * 0.4)).all()
    assert not (dropped & ~masked).any()
    assert not torch.equal(masked[0], masked[1])  # per sample


def test_mask_ratio_follows_the_truncated_normal():
    mean, std, lo, hi = 0.45, 0.25, 0.4, 1.0
    draws = torch.tensor([truncated_normal(mean, std, lo, hi, gen(i)) for i in range(4000)])
    a, b = (lo - mean) / std, (hi - mean) / std
    pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    expected = mean + std * (pdf(a) - pdf(b)) / (cdf(b) - cdf(a))  # about 0.61
    assert draws.min() >= lo and draws.max() <= hi
    assert abs(draws.mean().item() - expected) < 0.01


def test_encoder_never_sees_masked_ids():
    model, ids = mtm(), torch.randint(0, K, (2, GRID, GRID), generator=gen())
    masked, dropped = random_masks(2, 16, 0.6, 0.4, gen(1))
    token_mask = masked.view(2, 4, 4).repeat_interleave(2, 1).repeat_interleave(2, 2)
    other = torch.where(token_mask, (ids + 1) % K, ids)
    assert torch.allclose(model(ids, masked, dropped), model(other, masked, dropped), atol=1e-5)
    visible = torch.where(token_mask, ids, (ids + 1) % K)
    assert not torch.allclose(model(ids, masked, dropped), model(visible, masked, dropped), atol=1e-3)


def test_loss_covers_masked_patches_only_and_starts_at_ln_k():
    model, ids = mtm(), torch.randint(0, K, (4, GRID, GRID), generator=gen())
    masked, dropped = random_masks(4, 16, 0.5, 0.4, gen(2))
    logits = model(ids, masked, dropped)
    loss, acc = masked_token_loss(logits, ids, masked)
    assert abs(loss.item() - math.log(K)) < 0.05 * math.log(K) and 0 <= acc.item() <= 1
    token_mask = masked.view(4, 4, 4).repeat_interleave(2, 1).repeat_interleave(2, 2)
    noisy = logits + 5 * torch.randn(logits.shape, generator=gen(3)) * (~token_mask)[..., None]
    assert torch.allclose(masked_token_loss(noisy, ids, masked)[0], loss)
    perfect = logits + 100 * torch.nn.functional.one_hot(ids, K) * token_mask[..., None]
    assert masked_token_loss(perfect, ids, masked)[1].item() == 1.0


def test_requantisation_is_identity_on_clean_lookups():
    model = classifier()
    model.embed.load_codebook(torch.randn(K, D, generator=gen()))
    ids = torch.randint(0, K, (3, GRID, GRID), generator=gen(1))
    assert torch.equal(model.embed.nearest(model.embed(ids)), ids)
    assert torch.equal(model.embed.nearest(model.embed(ids), chunk=1), ids)  # one sample per chunk


def test_pretrained_encoder_hands_over_and_mismatches_are_refused(tmp_path):
    model, path = mtm(), tmp_path / "mtm.safetensors"
    save_mtm(model, path, "abc")
    target = classifier()
    load_encoder_into(target, path, "abc")
    for name, value in model.state_dict().items():
        if name.startswith(("patch_embed.", "blocks.")):
            assert torch.equal(target.vit.state_dict()[name], value), name
    assert target.vit.head.weight.abs().max() < 1e-3
    with pytest.raises(ValueError, match="depth: checkpoint 2 vs model 3"):
        load_encoder_into(classifier(depth=3), path, "abc")
    with pytest.raises(ValueError, match="pre-trained on codebook"):
        load_encoder_into(classifier(), path, "def")
    with pytest.raises(ValueError, match="embedding=learned"):
        load_encoder_into(classifier(embedding="codebook"), path, "abc")
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="model.pretrained: .*bad.safetensors.*cannot be read"):
        load_encoder_into(classifier(), tmp_path / "bad.safetensors", "abc")
    with pytest.raises(FileNotFoundError):
        load_encoder_into(classifier(), tmp_path / "missing.safetensors", "abc")


def task(**kw) -> ClassificationTask:
    model = dict(_target_="seit.models.vit.TokenViT", name="t", input="tokens", embed_dim=32, depth=3, num_heads=2,
                 embedding="learned", pretrained=None)
    optim = dict(_target_="seit.tasks.optim.create_optimizer", _partial_=True, blr=1e-3, base_batch=64,
                 lr_scaling="sqrt", layer_decay=0.5, weight_decay=0.1, betas=[0.9, 0.999], eps=1e-8)
    scheduler = dict(_target_="seit.tasks.schedule.warmup_cosine", _partial_=True, warmup_epochs=0, min_lr=0.0)
    data = dict(kind="tokens", num_classes=5, input_grid=GRID, batch_size=256, codebook_size=K, codebook_dim=D)
    return ClassificationTask(model=model, optim=optim, scheduler=scheduler, aug={"crop": GRID}, data=data, **kw)


def test_linear_probe_trains_only_the_head_and_keeps_the_body_in_eval_mode():
    t = task(linear_probe=True).train()
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("vit.head.", "vit.fc_norm.")) for n in trainable)
    assert not t.model.vit.blocks[0].training


def test_lr_scaling_and_layer_decay():
    rule = dict(lr=None, lr_scaling=None)
    assert scaled_lr(**{**rule, "lr_scaling": "sqrt"}, blr=1e-3, base_batch=64, global_batch=1024) == pytest.approx(4e-3)
    assert scaled_lr(**rule, blr=1.5e-4, base_batch=256, global_batch=4096) == pytest.approx(2.4e-3)  # MTM, linear
    with pytest.raises(ValueError, match="lr_scaling"):
        scaled_lr(lr=None, blr=1e-3, base_batch=None, lr_scaling="cubic", global_batch=64)
    t = task()

    class Trainer:  # what configure_optimizers reads
        estimated_stepping_batches, max_epochs, world_size, accumulate_grad_batches = 10, 1, 1, 1

    t._trainer = Trainer()
    config = t.configure_optimizers()
    groups = config["optimizer"].param_groups
    lrs = sorted({round(g["lr"], 12) for g in groups})
    assert max(lrs) == pytest.approx(2e-3)  # 1e-3 * sqrt(256 / 64): the head
    assert min(lrs) == pytest.approx(2e-3 * 0.5 ** 4)  # the stem: 3 blocks + 1 below the head
    schedule = config["lr_scheduler"]["scheduler"]
    assert schedule.get_last_lr() == [g["lr"] for g in groups]  # no warmup: the schedule starts at the layer lrs
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(t.model.vit.pos_embed) in no_decay and id(t.model.vit.blocks[0].attn.qkv.weight) not in no_decay


def test_soft_targets_share_credit_with_near_codes_and_reduce_to_the_id():
    from seit.models.mtm import masked_token_loss, soft_targets

    codebook = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [-1.0, 0.0]])
    idx, weight = soft_targets(codebook, tau=0.05, neighbours=3)
    assert idx[0, 0] == 0 and idx[0, 1] == 1 and torch.allclose(weight.sum(1), torch.ones(4))
    assert weight[0, 1] > 0.5 * weight[0, 0] and weight[0, 2] < 1e-6  # the near code shares, the far one not
    ids = torch.zeros(1, 2, 2, dtype=torch.long)
    masked = torch.ones(1, 1, dtype=torch.bool)
    near = torch.full((1, 2, 2, 4), -10.0)
    near[..., 1] = 10.0  # predicts the near-equivalent code
    far = torch.full((1, 2, 2, 4), -10.0)
    far[..., 3] = 10.0
    soft = (idx, weight)
    assert masked_token_loss(near, ids, masked, targets=soft)[0] < masked_token_loss(far, ids, masked, targets=soft)[0]
    assert masked_token_loss(near, ids, masked)[0].item() == pytest.approx(masked_token_loss(far, ids, masked)[0].item())
    sharp = soft_targets(codebook, tau=1e-4, neighbours=3)  # tau -> 0: the one-hot cross-entropy
    logits = torch.randn(1, 2, 2, 4)
    assert masked_token_loss(logits, ids, masked, targets=sharp)[0].item() == pytest.approx(
        masked_token_loss(logits, ids, masked)[0].item(), rel=1e-4)
