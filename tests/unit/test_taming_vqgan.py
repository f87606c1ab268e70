import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import as_before_codebook_dim_rename

from seit.tokenizers import TOKENIZERS, load_tokenizer
from seit.tokenizers.taming_vqgan import (
    TamingVQGAN,
    TamingVQGANTokenizer,
    from_taming_checkpoint,
    load_taming_checkpoint,
    taming_config,
)

# Tiny but structurally complete: 2 levels (one Downsample/Upsample), attention at 8 px, nin_shortcuts.
# Widths are multiples of 32 because taming's GroupNorm uses 32 groups.
TINY = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], in_channels=3, out_ch=3,
            resolution=16, z_channels=4, double_z=False, dropout=0.0, n_embed=16, codebook_dim=4)

# Names as they appear in the state dict of the original taming VQModel (f=16 layout, 5 levels).
KNOWN_TAMING_KEYS_F16 = [
    "encoder.conv_in.weight",
    "encoder.down.0.block.0.norm1.weight",
    "encoder.down.0.block.0.conv1.weight",
    "encoder.down.0.block.1.conv2.bias",
    "encoder.down.0.downsample.conv.weight",
    "encoder.down.2.block.0.nin_shortcut.weight",
    "encoder.down.4.attn.1.q.weight",
    "encoder.mid.block_1.norm1.weight",
    "encoder.mid.attn_1.q.weight",
    "encoder.mid.attn_1.proj_out.bias",
    "encoder.mid.block_2.conv2.weight",
    "encoder.norm_out.weight",
    "encoder.conv_out.weight",
    "quant_conv.weight",
    "quantize.embedding.weight",
    "post_quant_conv.weight",
    "decoder.conv_in.weight",
    "decoder.mid.attn_1.k.weight",
    "decoder.up.4.block.2.norm2.weight",
    "decoder.up.4.attn.2.v.weight",
    "decoder.up.1.upsample.conv.weight",
    "decoder.up.3.block.0.nin_shortcut.weight",
    "decoder.norm_out.bias",
    "decoder.conv_out.weight",
]


def _images(n=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def _model(seed=0, **over):
    torch.manual_seed(seed)
    return TamingVQGAN({**TINY, **over}).eval()


def _taming_ckpt(path, model, extra=None, drop=None, reshape=None):
    """Write a state dict the way taming/Lightning does: {"state_dict": {..., "loss.*": ...}, ...}."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    sd["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(8, 3, 3, 3)
    sd["loss.logvar"] = torch.zeros(())
    if drop:
        sd[drop.replace("weight", "wieght")] = sd.pop(drop)
    if reshape:
        sd[reshape] = torch.zeros(*sd[reshape].shape[:-1], sd[reshape].shape[-1] + 1)
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 1000, **(extra or {})}, path)
    return path


def test_key_layout_matches_taming_f16():
    model = TamingVQGAN(dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16],
                             resolution=256, z_channels=256, n_embed=1024, codebook_dim=256))
    sd = model.state_dict()
    missing = [k for k in KNOWN_TAMING_KEYS_F16 if k not in sd]
    assert not missing, missing
    assert tuple(sd["quantize.embedding.weight"].shape) == (1024, 256)
    assert tuple(sd["quant_conv.weight"].shape) == (256, 256, 1, 1)
    assert tuple(sd["encoder.down.1.downsample.conv.weight"].shape) == (128, 128, 3, 3)
    assert tuple(sd["decoder.conv_in.weight"].shape) == (512, 256, 3, 3)
    # no time embedding, no attention except at 16 px and mid, no downsample on the last level
    assert not any("temb" in k for k in sd)
    assert not any(k.startswith("encoder.down.3.attn") or k.startswith("decoder.up.3.attn") for k in sd)
    assert "encoder.down.4.downsample.conv.weight" not in sd and "decoder.up.0.upsample.conv.weight" not in sd


def test_key_layout_tiny():
    sd = _model().state_dict()
    for k in ["encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
              "encoder.down.1.block.0.nin_shortcut.weight", "encoder.down.1.attn.0.q.weight",
              "encoder.mid.attn_1.q.weight", "decoder.up.1.upsample.conv.weight", "decoder.up.1.attn.1.k.weight",
              "decoder.up.0.block.1.conv1.weight", "quantize.embedding.weight", "post_quant_conv.weight"]:
        assert k in sd, k
    assert "encoder.down.1.downsample.conv.weight" not in sd


def test_load_taming_checkpoint_gives_identical_outputs(tmp_path, caplog):
    model = _model()
    path = _taming_ckpt(tmp_path / "last.ckpt", model)
    with caplog.at_level("INFO", logger="seit.tokenizers.taming_vqgan"):
        loaded = load_taming_checkpoint(path, TINY)
    assert "dropped 3 loss.* keys" in caplog.text
    x = _images() * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode_latents(x), model.encode_latents(x))
        assert torch.equal(loaded(x), model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_load_bare_state_dict_and_safetensors(tmp_path):
    model = _model(seed=1)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    x = _images() * 2 - 1
    for name in ("bare.pt", "w.safetensors"):
        loaded = load_taming_checkpoint(tmp_path / name, TINY)
        assert torch.equal(loaded.encode_ids(x), model.encode_ids(x))


def test_tokenizer_encode_decode_shapes(tmp_path):
    tok = from_taming_checkpoint(_taming_ckpt(tmp_path / "last.ckpt", _model()), {**TINY, "kind": "taming_vqgan"})
    assert tok.kind == "taming_vqgan" and tok.image_size == 16 and tok.downsample == 2 and tok.grid == (8, 8)
    assert tok.codebook.shape == (16, 4) and tok.codebook_size == 16
    ids = tok.encode(_images(5))
    assert ids.shape == (5, 8, 8) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < 16
    out = tok.decode(ids)
    assert out.shape == (5, 3, 16, 16) and float(out.min()) >= 0 and float(out.max()) <= 1
    # encode really takes the nearest code of the latent, after mapping [0,1] -> [-1,1]
    with torch.no_grad():
        z = tok.model.encode_latents(_images(5) * 2 - 1).permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(torch.cdist(z, tok.codebook).argmin(1).reshape(5, 8, 8), ids)
    with pytest.raises(ValueError, match="16x16"):
        tok.encode(torch.rand(1, 3, 32, 32))


def test_batched_encode_equals_unbatched(tmp_path):
    tok = TamingVQGANTokenizer(_model(), batch_size=2)
    x = _images(5)
    assert torch.equal(tok.encode(x), torch.cat([tok.encode(x[i : i + 1]) for i in range(5)]))


def test_l2_normalized_codebook_uses_cosine():
    tok = TamingVQGANTokenizer(_model(l2_normalized=True))
    cb = tok.codebook
    assert torch.allclose(cb.norm(dim=1), torch.ones(16), atol=1e-5)
    x = _images(2)
    with torch.no_grad():
        z = tok.model.encode_latents(x * 2 - 1).permute(0, 2, 3, 1).reshape(-1, 4)
    expect = (torch.nn.functional.normalize(z, dim=1) @ cb.T).argmax(1).reshape(2, 8, 8)
    assert torch.equal(tok.encode(x), expect)


def test_save_load_tokenizer_round_trip(tmp_path):
    assert TOKENIZERS["taming_vqgan"] is TamingVQGANTokenizer
    tok = from_taming_checkpoint(_taming_ckpt(tmp_path / "last.ckpt", _model()), TINY)
    tok.save(tmp_path / "t.safetensors")
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["kind"] == "taming_vqgan" and json.loads(meta["config"])["ch_mult"] == [1, 2]
    assert not any(k.startswith("loss.") for k in keys)
    loaded = load_tokenizer(tmp_path / "t.safetensors")
    assert isinstance(loaded, TamingVQGANTokenizer) and loaded.config == tok.config
    x = _images(4, seed=3)
    ids = tok.encode(x)
    assert torch.equal(loaded.encode(x), ids)
    assert torch.equal(loaded.decode(ids), tok.decode(ids))
    assert loaded.fingerprint == tok.fingerprint


def test_renamed_key_raises_naming_file_and_key(tmp_path):
    path = _taming_ckpt(tmp_path / "renamed.ckpt", _model(), drop="encoder.mid.attn_1.q.weight")
    with pytest.raises(ValueError) as e:
        load_taming_checkpoint(path, TINY)
    msg = str(e.value)
    assert "renamed.ckpt" in msg
    assert "missing keys (in the model, not in the file) (1)" in msg and "encoder.mid.attn_1.q.weight" in msg
    assert "unexpected keys (in the file, not in the model) (1)" in msg and "encoder.mid.attn_1.q.wieght" in msg


def test_wrong_shape_raises_naming_file_key_and_fields(tmp_path):
    path = _taming_ckpt(tmp_path / "shape.ckpt", _model(), reshape="quantize.embedding.weight")
    with pytest.raises(ValueError) as e:
        load_taming_checkpoint(path, TINY)
    msg = str(e.value)
    assert "shape.ckpt" in msg and "quantize.embedding.weight: (16, 5) vs (16, 4)" in msg
    assert "n_embed / codebook_dim" in msg


def test_wrong_architecture_points_at_config_fields(tmp_path):
    path = _taming_ckpt(tmp_path / "last.ckpt", _model())
    with pytest.raises(ValueError) as e:
        load_taming_checkpoint(path, {**TINY, "ch_mult": [1, 2, 2]})
    msg = str(e.value)
    assert "last.ckpt" in msg and "missing keys" in msg and "encoder.down.2.block.0.conv1.weight" in msg
    assert "... and 18 more" in msg and "ch / ch_mult" in msg
    assert "the file's weights look like: ch_mult=[1, 2]" in msg
    with pytest.raises(ValueError) as e:
        load_taming_checkpoint(path, {**TINY, "z_channels": 8})
    msg = str(e.value)
    assert "encoder.conv_out.weight: (4, 64, 3, 3) vs (8, 64, 3, 3)" in msg
    assert "z_channels=4" in msg.split("look like")[1]
    with pytest.raises(ValueError, match="num_res_blocks=1"):
        load_taming_checkpoint(path, {**TINY, "num_res_blocks": 2})
    with pytest.raises(ValueError, match=r"attn_resolutions=\[8\]"):
        load_taming_checkpoint(path, {**TINY, "attn_resolutions": [16]})


def test_missing_file_and_unsafe_pickle(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_taming_checkpoint(tmp_path / "nope.ckpt", TINY)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        from_taming_checkpoint(tmp_path / "nope.ckpt", TINY)
    # old Lightning checkpoints key callbacks by class: weights_only refuses, and the error says what to do
    path = _taming_ckpt(tmp_path / "old.ckpt", _model(), extra={"callbacks": {TamingVQGAN: {}}})
    with pytest.raises(ValueError, match="old.ckpt.*weights_only") as e:
        load_taming_checkpoint(path, TINY)
    assert "safetensors" in str(e.value)


def test_config_accepts_taming_layout_and_omegaconf():
    from omegaconf import OmegaConf

    nested = {"model": {"target": "taming.models.vqgan.VQModel",
                        "params": {"embed_dim": 4, "n_embed": 16,  # taming's name for the codebook width
                                   "ddconfig": {k: v for k, v in TINY.items() if k not in ("n_embed", "codebook_dim")},
                                   "lossconfig": {"target": "x"}}}}
    flat = taming_config(TINY)
    assert taming_config(nested) == flat
    assert taming_config(OmegaConf.create({**TINY, "kind": "taming_vqgan", "checkpoint": "x"})) == flat
    assert flat["image_size"] == 16
    repo_cfg = taming_config(OmegaConf.load("conf/tokenizer/taming_vqgan.yaml"))
    assert repo_cfg["ch_mult"] == [1, 1, 2, 2, 4] and repo_cfg["n_embed"] == 1024 and repo_cfg["image_size"] == 256
    with pytest.raises(ValueError, match="ch_mult"):
        taming_config({k: v for k, v in TINY.items() if k != "ch_mult"})
    with pytest.raises(ValueError, match="multiple of 32"):
        taming_config({**TINY, "ch": 8})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_runs_on_gpu_and_returns_on_input_device(tmp_path):
    tok = from_taming_checkpoint(_taming_ckpt(tmp_path / "last.ckpt", _model()), {**TINY, "device": "cuda"})
    assert tok.device.type == "cuda"
    ids = tok.encode(_images(2))
    assert ids.device.type == "cpu" and ids.shape == (2, 8, 8)
    assert tok.decode(ids).device.type == "cpu"
    assert tok.codebook.device.type == "cpu"


def test_a_tokenizer_saved_before_the_codebook_dim_rename_loads(tmp_path):
    tok = from_taming_checkpoint(_taming_ckpt(tmp_path / "last.ckpt", _model()), TINY)
    path = tmp_path / "old.safetensors"
    tok.save(path)
    config = as_before_codebook_dim_rename(path)
    assert config["codebook_dim"] == 4 and "embed_dim" not in config
    loaded = load_tokenizer(path)
    assert loaded.config == tok.config and loaded.codebook_dim == 4
    x = _images(2, seed=1)
    assert torch.equal(loaded.encode(x), tok.encode(x))
