"""SeiT's released token format (naver-ai/seit ``datasets.py``), re-implemented from its description.

Per image, each id b < 255 is one byte; an id >= 255 is written as escape bytes 255 (each adds
255) followed by the remainder, so ids 0-254 take 1 byte and 255-509 take 2. All images are
concatenated into one gzip stream (``*-token.data.bin.gz``) with a gzipped ``.npy`` of N+1 byte
offsets beside it (``*-token.index.npy.gz``). Used for the storage comparison and for import and
export of SeiT token sets.
"""

from __future__ import annotations

import numpy as np

ESCAPE = 255


def escape_encode(ids: np.ndarray) -> bytes:
    """One image's ids (any shape) -> SeiT's escape-byte string."""
    flat = ids.reshape(-1).astype(np.int64)
    if flat.size and flat.min() < 0:
        raise ValueError("ids must be non-negative")
    escapes = flat // ESCAPE
    lengths = escapes + 1
    out = np.full(int(lengths.sum()), ESCAPE, dtype=np.uint8)
    ends = np.cumsum(lengths) - 1
    out[ends] = (flat - escapes * ESCAPE).astype(np.uint8)
    return out.tobytes()


def escape_decode(data: bytes, num_tokens: int) -> np.ndarray:
    """SeiT's escape-byte string -> ``num_tokens`` ids (int64); raises if the count is off."""
    raw = np.frombuffer(data, dtype=np.uint8)
    is_value = raw != ESCAPE
    if raw.size and not is_value[-1]:
        raise ValueError("token string ends inside an escape sequence")
    values = raw[is_value].astype(np.int64)
    if values.size != num_tokens:
        raise ValueError(f"decoded {values.size} tokens, expected {num_tokens}")
    escape_counts = np.diff(np.concatenate([[-1], np.flatnonzero(is_value)])) - 1
    return values + ESCAPE * escape_counts
