import numpy as np
import pytest

from seit.data.codec import CodecError, decode_zstd_planes, encode_zstd_planes, get_codec, id_dtype


@pytest.mark.parametrize("k", [2, 256, 257, 391, 8192, 65536])
def test_random_round_trip_is_bit_exact(k):
    ids = np.random.default_rng(k).integers(0, k, (7, 32, 32)).astype(np.uint16)
    out = decode_zstd_planes(encode_zstd_planes(ids, k))
    assert out.dtype == np.uint16 and out.shape == ids.shape
    np.testing.assert_array_equal(out, ids)


@pytest.mark.parametrize("make", [
    lambda k: np.zeros((3, 16, 16), np.uint16),                      # all equal
    lambda k: np.full((3, 16, 16), k - 1, np.uint16),                # the max id
    lambda k: np.arange(3 * 16 * 16, dtype=np.uint16).reshape(3, 16, 16) % k,  # all distinct (k=1024)
    lambda k: np.zeros((0, 16, 16), np.uint16),                      # empty chunk
])
def test_adversarial_grids_round_trip(make):
    ids = make(1024)
    np.testing.assert_array_equal(decode_zstd_planes(encode_zstd_planes(ids, 1024)), ids)


def test_narrowest_dtype():
    assert id_dtype(256).itemsize == 1 and id_dtype(257).itemsize == 2
    with pytest.raises(ValueError):
        id_dtype(65537)


def test_out_of_range_ids_refused():
    with pytest.raises(ValueError, match="out of range"):
        encode_zstd_planes(np.full((1, 2, 2), 300, np.uint16), 256)


def test_corrupt_and_truncated_payloads_raise():
    payload = encode_zstd_planes(np.random.default_rng(0).integers(0, 500, (4, 8, 8)).astype(np.uint16), 500)
    with pytest.raises(CodecError):
        decode_zstd_planes(payload[: len(payload) // 2])
    flipped = bytearray(payload)
    flipped[-3] ^= 0xFF
    with pytest.raises(CodecError):
        decode_zstd_planes(bytes(flipped))
    with pytest.raises(CodecError, match="header"):
        decode_zstd_planes(b"XXXX" + payload[4:])


def test_unknown_codec_lists_known():
    with pytest.raises(ValueError, match="zstd-planes"):
        get_codec("nope")
