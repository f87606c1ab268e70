"""Lossless codecs for blocks of token ids.

A codec turns an id array ``[n, H, W]`` into bytes and back, bit-exactly. The dataset names
its codec in ``dataset.json`` so readers pick the matching decoder; new codecs register here.

``zstd-planes`` (v1): ids are stored in the narrowest unsigned dtype that holds the codebook
(uint8 for K <= 256, else uint16), the little-endian byte planes are split apart (all low
bytes, then all high bytes) and the result is zstd-compressed with a frame checksum. The high
plane of a K=1024 codebook only holds values 0..3, so it compresses to almost nothing, while
interleaved uint16 would hide that structure from zstd.

``ctx-rans`` (v2, ``codec_ctx``): a per-dataset model of each token given its neighbours and an
rANS coder; its model lives in the dataset dir, so ``get_codec`` takes that dir.

Callers resolve a codec once per process (``get_codec`` loads the model) and pass the ``Codec``
object to every chunk; a bare name is accepted where the codec needs no model. ``Codec``,
``CodecError`` and ``check_shape`` live in ``codec_base`` (so codecs need not import this
registry) and are imported from here as before.
"""

from __future__ import annotations

import struct
import os
from typing import Callable

import numpy as np
import zstandard

from seit.data.codec_base import Codec, CodecError, check_shape

_HEADER = struct.Struct("<4sBBHHI")  # magic, version, bytes per id, H, W, n
_MAGIC = b"STOK"


def id_dtype(codebook_size: int) -> np.dtype:
    if codebook_size <= 0 or codebook_size > 65536:
        raise ValueError(f"codebook_size must be in 1..65536, got {codebook_size}")
    return np.dtype(np.uint8) if codebook_size <= 256 else np.dtype("<u2")


def encode_zstd_planes(ids: np.ndarray, codebook_size: int, level: int = 19) -> bytes:
    if ids.ndim != 3:
        raise ValueError(f"ids must be [n, H, W], got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= codebook_size):
        raise ValueError(f"ids out of range [0, {codebook_size}): min {ids.min()}, max {ids.max()}")
    dtype = id_dtype(codebook_size)
    n, h, w = ids.shape
    planes = ids.astype(dtype).reshape(-1).view(np.uint8).reshape(-1, dtype.itemsize).T
    body = zstandard.ZstdCompressor(level=level, write_checksum=True).compress(
        np.ascontiguousarray(planes).tobytes()
    )
    return _HEADER.pack(_MAGIC, 1, dtype.itemsize, h, w, n) + body


def zstd_frame_size(frame: bytes, expected: int, what: str) -> None:
    """A zstd frame must declare the size it decodes to, and it must be ``expected`` (or at most
    ``-expected``), checked before decompressing: a damaged size field must not allocate terabytes."""
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{what}: not a zstd frame ({exc})") from exc
    if size < 0 or (size != expected if expected >= 0 else size > -expected):
        raise CodecError(f"{what}: zstd frame declares {size} bytes, expected "
                         f"{expected if expected >= 0 else f'at most {-expected}'}")


def decode_zstd_planes(payload: bytes, shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """ids uint16 [n,H,W]; ``shape``, when given, must match the header (checked before allocating)."""
    if len(payload) < _HEADER.size:
        raise CodecError(f"payload of {len(payload)} bytes is shorter than the header")
    magic, version, itemsize, h, w, n = _HEADER.unpack_from(payload)
    if magic != _MAGIC or version != 1 or itemsize not in (1, 2):
        raise CodecError(f"bad header (magic={magic!r}, version={version}, itemsize={itemsize})")
    check_shape((n, h, w), shape)
    expected = n * h * w * itemsize
    zstd_frame_size(payload[_HEADER.size :], expected, "ids")
    try:
        raw = zstandard.ZstdDecompressor().decompress(payload[_HEADER.size :], max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd stream is corrupt or truncated: {exc}") from exc
    if len(raw) != expected:
        raise CodecError(f"decoded {len(raw)} bytes, expected {expected} for [{n},{h},{w}]")
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(itemsize, -1)
    dtype = np.uint8 if itemsize == 1 else np.dtype("<u2")
    ids = np.ascontiguousarray(planes.T).view(dtype).reshape(n, h, w)
    return ids.astype(np.uint16, copy=False)


def _zstd_planes(model_dir: str | os.PathLike | None) -> Codec:
    return Codec("zstd-planes", encode_zstd_planes, decode_zstd_planes)


def _ctx_rans(model_dir: str | os.PathLike | None) -> Codec:
    from seit.data.codec_ctx import load_codec  # imported late: only datasets coded with it load numba

    return load_codec(model_dir)


# name -> factory(model_dir); model_dir is the dataset dir, ignored by codecs without a model
CODECS: dict[str, Callable[[str | os.PathLike | None], Codec]] = {
    "zstd-planes": _zstd_planes,
    "ctx-rans": _ctx_rans,
}
MODEL_CODECS = frozenset({"ctx-rans"})  # codecs whose model is fitted per dataset before its first shard


def get_codec(name: str, model_dir: str | os.PathLike | None = None) -> Codec:
    """Resolve a codec; one with a model (``MODEL_CODECS``) loads it from model_dir, so call once per process."""
    try:
        factory = CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known codecs: {sorted(CODECS)}") from None
    return factory(model_dir)


def as_codec(codec: Codec | str) -> Codec:
    return codec if isinstance(codec, Codec) else get_codec(codec)
