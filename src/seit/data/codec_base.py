"""What every codec shares: the ``Codec`` handle, ``CodecError`` and the header shape check.

Kept apart from the registry (``codec``) so that a codec module (``codec_ctx``) builds on these
without importing the registry that lists it: the dependency runs one way, registry -> codecs -> base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


class CodecError(ValueError):
    """A payload that cannot be decoded: corrupt, truncated or of the wrong shape."""


def check_shape(found: tuple[int, int, int], shape: tuple[int, int, int] | None) -> None:
    """Refuse a payload whose header claims another shape than the caller expects, before allocating."""
    if shape is not None and tuple(found) != tuple(shape):
        raise CodecError(f"header claims ids of shape {list(found)}, expected {list(shape)}")


Encoder = Callable[[np.ndarray, int], bytes]
Decoder = Callable[..., np.ndarray]  # (payload, shape=None) -> ids


@dataclass(frozen=True)
class Codec:
    """A codec ready to use: ``encode(ids [n,H,W], codebook_size) -> bytes`` and
    ``decode(bytes, shape=None) -> uint16 ids [n,H,W]``; a given ``shape`` is checked against the
    payload's header before anything is allocated."""

    name: str
    encode: Encoder
    decode: Decoder
