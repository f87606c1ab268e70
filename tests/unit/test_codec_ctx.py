from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from conftest import tokenize_config
from seit.data.codec import CodecError, get_codec
from seit.data.codec_ctx import MODEL_FILE, CtxModel, decode_ctx, encode_ctx, load_model
from seit.data.dataset_info import TokenDatasetInfo
from seit.data.token_stream import TokenStream

K = 300


def smooth_ids(n: int, h: int = 12, w: int = 10, k: int = K, seed: int = 0) -> np.ndarray:
    """Grids with the structure the model looks for: runs of copies and ids near their up neighbour."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, k, (n, h, w))
    for i in range(1, h):
        copy = rng.random((n, w)) < 0.5
        ids[:, i] = np.where(copy, ids[:, i - 1], (ids[:, i - 1] + rng.integers(-3, 4, (n, w))) % k)
    return ids.astype(np.uint16)


@pytest.fixture(scope="module")
def model() -> CtxModel:
    return CtxModel.fit(smooth_ids(64), K)


def round_trip(model: CtxModel, ids: np.ndarray) -> np.ndarray:
    out = decode_ctx(model, encode_ctx(model, ids, model.codebook_size))
    assert out.dtype == np.uint16 and out.shape == ids.shape
    return out


@pytest.mark.parametrize("ids", [
    smooth_ids(20, seed=1),
    np.random.default_rng(2).integers(0, K, (7, 8, 9)).astype(np.uint16),  # no structure at all
    np.zeros((3, 16, 16), np.uint16),  # all equal
    np.full((2, 5, 5), K - 1, np.uint16),  # the max id
    np.arange(4 * 8 * 8, dtype=np.uint16).reshape(4, 8, 8) % K,  # all distinct within a grid
    smooth_ids(1, h=1, w=1),  # a single token
    np.zeros((0, 32, 32), np.uint16),  # no samples
])
def test_lossless(model, ids):
    assert (round_trip(model, ids) == ids).all()


def test_ids_unseen_when_fitting_round_trip():
    seen_only_low = CtxModel.fit(smooth_ids(16, k=10), K)
    ids = np.random.default_rng(3).integers(0, K, (5, 8, 8)).astype(np.uint16)
    assert (round_trip(seen_only_low, ids) == ids).all()


def test_model_compresses_structured_ids(model):
    ids = smooth_ids(64, seed=4)
    payload = encode_ctx(model, ids, K)
    assert len(payload) * 8 / ids.size < 0.75 * np.log2(K)


def test_out_of_range_and_wrong_k_rejected(model):
    with pytest.raises(ValueError, match="out of range"):
        encode_ctx(model, np.full((1, 2, 2), K, np.uint16), K)
    with pytest.raises(ValueError, match="codebook size"):
        encode_ctx(model, np.zeros((1, 2, 2), np.uint16), K + 1)


def test_corrupt_truncated_or_foreign_streams_raise(model):
    payload = encode_ctx(model, smooth_ids(4, seed=5), K)
    with pytest.raises(CodecError, match="shorter than"):
        decode_ctx(model, payload[:10])
    with pytest.raises(CodecError, match="corrupt or truncated"):
        decode_ctx(model, payload[:-2])
    flipped = bytearray(payload)
    flipped[-7] ^= 0x10
    with pytest.raises(CodecError, match="corrupt or truncated"):
        decode_ctx(model, bytes(flipped))
    with pytest.raises(CodecError, match="bad ctx-rans header"):
        decode_ctx(model, b"XXXX" + payload[4:])
    other = CtxModel.fit(smooth_ids(8, seed=6, k=50), K)
    with pytest.raises(CodecError, match="wrong or replaced"):
        decode_ctx(other, payload)


def test_model_file_round_trips(tmp_path, model):
    model.save(tmp_path / MODEL_FILE)
    loaded = load_model(tmp_path)
    assert loaded.fingerprint == model.fingerprint
    assert loaded.version == 2 and loaded.tables.keys() == model.tables.keys()
    assert all((loaded.tables[n] == model.tables[n]).all() for n in model.tables)
    assert (tmp_path / MODEL_FILE).stat().st_size < 16_000
    codec = get_codec("ctx-rans", model_dir=tmp_path)
    ids = smooth_ids(3, seed=7)
    assert (codec.decode(encode_ctx(model, ids, K)) == ids).all()


def test_version_1_models_and_chunks_still_decode():
    fixture = Path(__file__).parents[1] / "data" / "ctx_rans_v1"
    old = load_model(fixture)
    assert old.version == 1 and old.codebook_size == 12
    ids = np.random.default_rng(0).integers(0, 12, (6, 5, 7)).astype(np.uint16)
    assert (decode_ctx(old, (fixture / "chunk.bin").read_bytes()) == ids).all()
    assert encode_ctx(old, ids, 12) == (fixture / "chunk.bin").read_bytes()


def test_two_experts_beat_one_when_ids_depend_on_both_neighbours():
    """An id's tens come from its up neighbour, its units from its left one: only the product knows both."""
    rng = np.random.default_rng(8)
    ids = rng.integers(0, K, (96, 12, 12))
    for i in range(1, 12):
        for j in range(1, 12):
            ids[:, i, j] = ids[:, i - 1, j] // 10 * 10 + (ids[:, i, j - 1] + rng.integers(0, 2, 96)) % 10
    ids = ids.astype(np.uint16)
    both = CtxModel.fit(ids[:64], K, clusters=8)
    up_only = CtxModel(K, {"event_freq": both.tables["event_freq"], "cluster": both.tables["cluster_up"],
                           "literal_freq": both.tables["freq_up"]})
    test = ids[64:]
    assert (round_trip(both, test) == test).all() and (round_trip(up_only, test) == test).all()
    assert len(encode_ctx(both, test, K)) < 0.9 * len(encode_ctx(up_only, test, K))


def test_cluster_count_is_chosen_by_description_length():
    ids = smooth_ids(64, seed=9)
    few = CtxModel.fit(ids, K)  # codes only these 64 grids: a large model cannot pay for itself
    many = CtxModel.fit(ids, K, total_samples=10**7)
    assert len(few.tables["freq_up"]) < len(many.tables["freq_up"]) == 32
    assert len(few.to_bytes()) + len(encode_ctx(few, ids, K)) <= len(many.to_bytes()) + len(encode_ctx(many, ids, K))


def test_product_tables_are_integer_exact():
    """Built without floats: the same stored tables give the same frequencies everywhere."""
    from seit.data.codec_ctx import LITERAL_BITS, _product_tables

    fu = np.array([[1, 2, (1 << 14) - 3]], np.uint16)
    fl = np.array([[(1 << 14) - 3, 2, 1], [1, 1, (1 << 14) - 2]], np.uint16)
    marginal = np.array([100, 200, (1 << 14) - 300], np.uint16)
    table = _product_tables(fu, fl, marginal)
    assert table.dtype == np.int64 and table.shape == (2, 3)
    assert (table.sum(1) == 1 << LITERAL_BITS).all() and (table >= 1).all()
    assert table[1].argmax() == 2 and table[0].argmax() == 0


def test_missing_or_bad_model_file(tmp_path):
    with pytest.raises(ValueError, match="needs its model"):
        get_codec("ctx-rans")
    with pytest.raises(CodecError, match="not found"):
        get_codec("ctx-rans", model_dir=tmp_path)
    (tmp_path / MODEL_FILE).write_bytes(b"not a model")
    with pytest.raises(CodecError, match="not a valid ctx-rans model"):
        get_codec("ctx-rans", model_dir=tmp_path)


def test_tokenize_then_stream_round_trip(tmp_path, image_folder):
    from seit.pipelines.tokenize import tokenize

    ref = tokenize(tokenize_config(image_folder, tmp_path / "ref", codec="zstd-planes", synonyms_k=0))
    meta = tokenize(tokenize_config(image_folder, tmp_path / "ctx", synonyms_k=0))
    assert meta["codec"] == "ctx-rans" and meta["codec_model"] == MODEL_FILE
    assert meta["storage"]["codec_model_bytes"] == (tmp_path / "ctx" / MODEL_FILE).stat().st_size

    def read(root):
        info = TokenDatasetInfo.open(root)
        stream = TokenStream(info.shard_specs("train"), codec=info.codec, batch_size=5, train=False, num_workers=2)
        batches = list(DataLoader(stream, batch_size=None, num_workers=2))
        return {k: ids for b in batches for k, ids in zip(b["key"], b["ids"].numpy())}

    ours, theirs = read(tmp_path / "ctx"), read(tmp_path / "ref")
    assert ours.keys() == theirs.keys() and len(ours) == ref["splits"]["train"]
    assert all((ours[k] == theirs[k]).all() for k in ours)


def test_resume_reuses_the_model_and_gives_identical_shards(tmp_path, image_folder, monkeypatch):
    from seit.pipelines import tokenize as tok

    first = tok.tokenize(tokenize_config(image_folder, tmp_path / "a", synonyms_k=0))
    root = tmp_path / "b"
    cfg = tokenize_config(image_folder, root, synonyms_k=0)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # interrupted after the shards: a re-run must reuse the model
        m.setattr(tok, "write_dataset_info", killed)
        with pytest.raises(KeyboardInterrupt):
            tok.tokenize(cfg)
    model_bytes = (root / MODEL_FILE).read_bytes()
    resumed = tok.tokenize(cfg)
    assert (root / MODEL_FILE).read_bytes() == model_bytes
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in first["shards"]]
