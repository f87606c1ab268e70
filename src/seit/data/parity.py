"""Erasure-coded recovery data ("parity") for token shards, so that damage can be repaired after the JPEGs are gone.

A parity file holds ``m`` Reed-Solomon parity blocks computed over the shard cut into ``k`` equal data
blocks (the last one zero-padded), plus a header naming the hash of every block. Repair hashes the
shard's blocks, treats the ones whose hash differs (or that lie past a truncated end) as erasures, and
rebuilds them from any ``k`` intact blocks among the ``k + m``: any damage that touches at most ``m``
blocks is repaired, wherever it is and whichever blocks (data or parity) it hits.

``m = ceil(fraction * k) + 1``: the extra block is there because a damaged byte range rarely starts on a
block boundary, so a contiguous range of up to ``fraction`` of the shard's bytes (a zeroed chunk, a
truncated tail, a bad disk sector run) always touches at most ``m`` blocks and is always repaired.
Scattered damage (single flipped bytes in many places) costs one block per place; it is repaired while
it hits at most ``m`` distinct blocks. A deleted shard is 100% loss: it is rebuilt only with ``fraction=1``.

The code is zfec's (``zfec.Encoder``/``zfec.Decoder``): a systematic Reed-Solomon erasure code over
GF(2^8) with a Vandermonde matrix, after L. Rizzo, "Effective erasure codes for reliable computer
communication protocols", ACM SIGCOMM CCR 27(2), 1997; https://github.com/tahoe-lafs/zfec. Its output
has stayed byte-identical since 2007 (Tahoe-LAFS stores it), so identical shards give identical parity
files on every version and platform. GF(2^8) limits ``k + m`` to 256, which sets a floor on the block
size of big shards (``block_size >= shard_bytes / (256 - m)``).

File layout (little-endian; the header is written twice, before and after the parity blocks, and each
copy carries its own sha256, so one damaged copy is tolerated; a copy is found by its magic)::

    header  = MAGIC(8) version:u16 algorithm:u16 shard_size:u64 block_size:u32 k:u16 m:u16
              shard_sha256(32) data_hash(16) * k parity_hash(16) * m header_sha256(32)
    file    = header | parity block (block_size bytes) * m | header

A block hash is the first 16 bytes of the block's sha256 (collision resistance is not needed to spot
damage, and the header is the part of the file that grows with ``k``). The header sha256 covers every
header byte before it.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from seit.utils.io import atomic_write_bytes

PARITY_DIR = "parity"  # suggested home: <dataset>/parity/<shard name>.par
PARITY_EXT = ".par"
FORMAT_VERSION = 1
ALGORITHM_ZFEC_RS = 1  # zfec: systematic Reed-Solomon over GF(2^8), Vandermonde (Rizzo 1997)

MAGIC = b"SEIT-PAR"
_FIXED = struct.Struct("<8sHHQIHH")  # magic, version, algorithm, shard_size, block_size, k, m
_HASH = 16  # bytes of each block's sha256 kept in the header
_MAX_SHARES = 256  # zfec: k + m <= 256 (GF(2^8))
_BYTES_PER_BLOCK = 2 * _HASH  # header bytes per block, both copies


class ParityError(ValueError):
    """A shard cannot be repaired (too much damage, unusable or stale parity). The message is one line."""


@dataclass
class ParityHeader:
    version: int
    algorithm: int
    shard_size: int  # bytes of the intact shard
    block_size: int  # bytes per block
    k: int  # data blocks
    m: int  # parity blocks
    shard_sha256: str  # hex
    data_hashes: list[bytes]  # k * 16 bytes
    parity_hashes: list[bytes]  # m * 16 bytes

    def to_bytes(self) -> bytes:
        body = (_FIXED.pack(MAGIC, self.version, self.algorithm, self.shard_size, self.block_size, self.k, self.m)
                + bytes.fromhex(self.shard_sha256) + b"".join(self.data_hashes) + b"".join(self.parity_hashes))
        return body + hashlib.sha256(body).digest()

    @staticmethod
    def length(k: int, m: int) -> int:
        return _FIXED.size + 32 + _HASH * (k + m) + 32


@dataclass
class ParityCheck:
    """What :func:`check_parity` found; ``problem`` is None when the shard and its parity file are both intact."""

    shard: str
    parity: str
    header_ok: bool  # at least one header copy is intact
    shard_ok: bool  # the shard's sha256 matches the header (and the expected sha256 when given)
    k: int = 0
    m: int = 0
    bad_data_blocks: int = 0
    bad_parity_blocks: int = 0
    repairable: bool = False  # the shard is damaged and enough blocks survive to rebuild it
    problem: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RepairResult:
    shard: str
    repaired: bool  # False: the shard was intact and was left alone
    bad_data_blocks: int
    bad_parity_blocks: int
    k: int
    m: int
    sha256: str  # of the (now) intact shard

    def to_dict(self) -> dict:
        return asdict(self)


def _zfec():
    try:
        import zfec
    except ImportError as e:  # optional extra: pip install 'seit[parity]'
        raise ImportError("shard parity needs zfec: pip install 'seit[parity]' (or zfec)") from e
    return zfec


def _block_hash(block: bytes) -> bytes:
    return hashlib.sha256(block).digest()[:_HASH]


def parity_blocks(k: int, fraction: float) -> int:
    """Parity blocks for ``k`` data blocks so that a contiguous run of ``fraction`` of the bytes is repairable."""
    if not 0 < fraction <= 1:
        raise ValueError(f"parity fraction must be in (0, 1], got {fraction}")
    return math.ceil(fraction * k - 1e-9) + 1


def max_data_blocks(fraction: float) -> int:
    """The largest ``k`` with ``k + m <= 256`` at this fraction."""
    k = _MAX_SHARES - 1
    while k > 1 and k + parity_blocks(k, fraction) > _MAX_SHARES:
        k -= 1
    return k


def choose_block_size(shard_size: int, fraction: float) -> int:
    """The block size (bytes) that gives the smallest parity file for a shard of ``shard_size`` bytes.

    The file costs ``m * block_size`` plus ``32 * (k + m)`` header bytes (two copies of 16-byte hashes):
    about ``fraction * size + size / k + 32 * k``, smallest near ``k = sqrt(size / 32)``. Every ``k`` up
    to zfec's limit is tried (ties go to the larger ``k``, which tolerates more scattered damage).
    """
    best = None
    for k in range(1, max_data_blocks(fraction) + 1):
        block = max(1, math.ceil(shard_size / k))
        kk = max(1, math.ceil(shard_size / block))
        m = parity_blocks(kk, fraction)
        key = (m * block + 2 * ParityHeader.length(kk, m), -kk)
        if best is None or key < best[0]:
            best = (key, block)
    return best[1]


def layout(shard_size: int, fraction: float, block_size: int | None = None) -> tuple[int, int, int]:
    """(block_size, k, m) for a shard of ``shard_size`` bytes. Raises ValueError if ``k + m > 256``."""
    block_size = choose_block_size(shard_size, fraction) if block_size is None else int(block_size)
    if block_size < 1:
        raise ValueError(f"parity block_size must be >= 1, got {block_size}")
    k = max(1, math.ceil(shard_size / block_size))
    m = parity_blocks(k, fraction)
    if k + m > _MAX_SHARES:
        smallest = math.ceil(shard_size / max_data_blocks(fraction))
        raise ValueError(f"parity: {k} data + {m} parity blocks exceed zfec's {_MAX_SHARES}; "
                         f"use block_size >= {smallest} for a {shard_size}-byte shard (or leave it automatic)")
    return block_size, k, m


def _split(data: bytes, block_size: int, k: int) -> list[bytes]:
    """k blocks of block_size bytes; bytes past the end of ``data`` are zeros (padding or truncation)."""
    data = data[:block_size * k]
    data = data + b"\0" * (block_size * k - len(data))
    return [data[i * block_size:(i + 1) * block_size] for i in range(k)]


def parity_bytes(shard: bytes, fraction: float, block_size: int | None = None) -> tuple[bytes, ParityHeader]:
    """The parity file's bytes for ``shard`` (a pure function of its arguments)."""
    block_size, k, m = layout(len(shard), fraction, block_size)
    zfec = _zfec()
    data = _split(shard, block_size, k)
    parity = [bytes(b) for b in zfec.Encoder(k, k + m).encode(tuple(data), tuple(range(k, k + m)))]
    header = ParityHeader(version=FORMAT_VERSION, algorithm=ALGORITHM_ZFEC_RS, shard_size=len(shard),
                          block_size=block_size, k=k, m=m, shard_sha256=hashlib.sha256(shard).hexdigest(),
                          data_hashes=[_block_hash(b) for b in data], parity_hashes=[_block_hash(b) for b in parity])
    head = header.to_bytes()
    return head + b"".join(parity) + head, header


def write_parity(shard_path: str | os.PathLike, parity_path: str | os.PathLike, fraction: float,
                 block_size: int | None = None) -> dict:
    """Write recovery data for one shard, atomically; the bytes depend on the shard's bytes and the arguments only.

    Args:
        shard_path: the shard (any file; read whole, so a few MB at most is the intended size).
        parity_path: where to write, e.g. ``<dataset>/parity/<shard name>.par`` (see :func:`parity_path_for`).
        fraction: in (0, 1]: a contiguous damaged run of up to this fraction of the shard's bytes is
            repairable (``m = ceil(fraction * k) + 1`` parity blocks); 1.0 also rebuilds a deleted shard.
        block_size: bytes per block; None (default) picks the one giving the smallest file
            (:func:`choose_block_size`). Smaller blocks tolerate more scattered damage but cost 32 header
            bytes each. ValueError if it makes ``k + m > 256``.

    Returns:
        ``{"file": parity file name, "bytes", "sha256": of the parity file, "fraction", "k", "m", "block_size"}``.
    """
    shard = Path(shard_path).read_bytes()
    blob, header = parity_bytes(shard, fraction, block_size)
    atomic_write_bytes(parity_path, blob)
    return {"file": os.path.basename(parity_path), "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
            "fraction": fraction, "k": header.k, "m": header.m, "block_size": header.block_size}


def parity_path_for(root: str | os.PathLike, shard_name: str) -> Path:
    """The suggested parity file of a shard: ``<dataset root>/parity/<shard name>.par``."""
    return Path(root) / PARITY_DIR / f"{shard_name}{PARITY_EXT}"


def _parse_header(blob: bytes, offset: int) -> ParityHeader | None:
    """The header copy at ``offset`` if it is intact, else None."""
    if offset + _FIXED.size > len(blob):
        return None
    magic, version, algorithm, size, block_size, k, m = _FIXED.unpack_from(blob, offset)
    if magic != MAGIC or version != FORMAT_VERSION or algorithm != ALGORITHM_ZFEC_RS or k < 1 or m < 1:
        return None
    end = offset + ParityHeader.length(k, m)
    if end > len(blob) or hashlib.sha256(blob[offset:end - 32]).digest() != blob[end - 32:end]:
        return None
    if block_size < 1 or k != max(1, math.ceil(size / block_size)) or k + m > _MAX_SHARES:
        return None
    p = offset + _FIXED.size
    sha, p = blob[p:p + 32].hex(), p + 32
    data_hashes = [blob[p + i * _HASH:p + (i + 1) * _HASH] for i in range(k)]
    p += k * _HASH
    parity_hashes = [blob[p + i * _HASH:p + (i + 1) * _HASH] for i in range(m)]
    return ParityHeader(version, algorithm, size, block_size, k, m, sha, data_hashes, parity_hashes)


def _read_parity(blob: bytes) -> tuple[ParityHeader, list[bytes | None], bool] | None:
    """The first intact header copy, the parity blocks (None where missing or damaged) and whether the whole
    file is intact (both header copies, every block, nothing more), or None without an intact header."""
    header, offset = None, 0
    while header is None and offset >= 0:
        header = _parse_header(blob, offset)
        offset = blob.find(MAGIC, offset + 1)
    if header is None:
        return None
    start, b = ParityHeader.length(header.k, header.m), header.block_size
    blocks: list[bytes | None] = []
    for i, h in enumerate(header.parity_hashes):
        block = blob[start + i * b:start + (i + 1) * b]
        blocks.append(block if len(block) == b and _block_hash(block) == h else None)
    head = header.to_bytes()
    intact = all(p is not None for p in blocks) and blob == head + b"".join(blocks) + head
    return header, blocks, intact


def _read(path: str | os.PathLike) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None


def _diagnose(shard_path, parity_path, expected_sha256):
    """(check, header, shard bytes, data blocks or None where bad, parity blocks or None where bad)."""
    shard_name, parity_name = os.fspath(shard_path), os.fspath(parity_path)
    shard = _read(shard_path)
    blob = _read(parity_path)
    check = ParityCheck(shard=shard_name, parity=parity_name, header_ok=False, shard_ok=False)
    parsed = None if blob is None else _read_parity(blob)
    if parsed is None:
        check.problem = (f"parity file {parity_name} is missing" if blob is None else
                         f"parity file {parity_name} has no intact header (both copies damaged or not a parity file)")
        if shard is not None and expected_sha256 is not None:
            check.shard_ok = hashlib.sha256(shard).hexdigest() == expected_sha256
        return check, None, shard, None, None
    header, parity, parity_intact = parsed
    check.header_ok, check.k, check.m = True, header.k, header.m
    if expected_sha256 is not None and expected_sha256 != header.shard_sha256:
        check.problem = (f"parity file {parity_name} is for another version of {shard_name} "
                         f"(sha256 {header.shard_sha256[:12]}…, expected {expected_sha256[:12]}…)")
        return check, None, shard, None, None
    check.bad_parity_blocks = sum(p is None for p in parity)
    if shard is not None and len(shard) == header.shard_size and hashlib.sha256(shard).hexdigest() == header.shard_sha256:
        check.shard_ok = True
        data: list[bytes | None] = _split(shard, header.block_size, header.k)
        if not parity_intact:
            check.problem = (f"parity file {parity_name} is damaged ({check.bad_parity_blocks} of {header.m} parity "
                             f"blocks bad, or a header copy); the shard is intact: rewrite the parity")
    else:
        raw = shard or b""
        data = []
        for i, (block, h) in enumerate(zip(_split(raw, header.block_size, header.k), header.data_hashes)):
            # a block that reaches past a truncated end is damaged even if its zero fill happens to match
            complete = len(raw) >= min((i + 1) * header.block_size, header.shard_size)
            data.append(block if complete and _block_hash(block) == h else None)
        check.bad_data_blocks = sum(d is None for d in data)
        good = header.k - check.bad_data_blocks + header.m - check.bad_parity_blocks
        check.repairable = good >= header.k
        what = "missing" if shard is None else "damaged"
        check.problem = (f"shard {shard_name} is {what}: {check.bad_data_blocks} of {header.k} data blocks bad, "
                         f"{check.bad_parity_blocks} of {header.m} parity blocks bad; "
                         + ("repairable" if check.repairable else
                            f"not repairable (needs {header.k} intact blocks, has {good})"))
    return check, header, shard, data, parity


def check_parity(shard_path: str | os.PathLike, parity_path: str | os.PathLike,
                 expected_sha256: str | None = None) -> ParityCheck:
    """Hash a shard against its parity file without changing anything (for a verify scrub).

    Reports whether a header copy is intact, whether the shard matches it (and ``expected_sha256``, the
    shard's sha256 in dataset.json, when given: a mismatch with the header means the parity is stale),
    how many data/parity blocks are bad and whether the shard could be repaired. ``problem`` is a one-line
    description, None only when shard and parity file are both intact (an intact shard with a damaged
    parity file is a problem too: rewrite the parity). Never raises for damage.
    """
    return _diagnose(shard_path, parity_path, expected_sha256)[0]


def repair_shard(shard_path: str | os.PathLike, parity_path: str | os.PathLike,
                 expected_sha256: str | None = None) -> RepairResult:
    """Repair a damaged, truncated or missing shard from its parity file; the shard is replaced atomically,
    and only once the rebuilt bytes match the header's sha256 (and ``expected_sha256`` when given).

    An intact shard is left alone (``repaired=False``). Damaged parity blocks and one damaged header copy
    are tolerated as long as ``k`` blocks of the ``k + m`` survive.

    Raises:
        ParityError: one line naming the shard, if the parity file is missing, has no intact header or is
            for another version of the shard, or if more blocks are bad than the parity can rebuild
            (the shard is left untouched).
    """
    check, header, shard, data, parity = _diagnose(shard_path, parity_path, expected_sha256)
    if header is None:
        raise ParityError(f"cannot repair {check.shard}: {check.problem}")
    if check.shard_ok:
        return RepairResult(shard=check.shard, repaired=False, bad_data_blocks=0,
                            bad_parity_blocks=check.bad_parity_blocks, k=header.k, m=header.m,
                            sha256=header.shard_sha256)
    if not check.repairable:
        raise ParityError(check.problem)
    have = [(i, d) for i, d in enumerate(data) if d is not None]
    have += [(header.k + j, p) for j, p in enumerate(parity) if p is not None]
    have = have[:header.k]  # intact data blocks first: they need no decoding
    zfec = _zfec()
    blocks = zfec.Decoder(header.k, header.k + header.m).decode([b for _, b in have], [i for i, _ in have])
    rebuilt = b"".join(bytes(b) for b in blocks)[:header.shard_size]
    sha = hashlib.sha256(rebuilt).hexdigest()
    if sha != header.shard_sha256:  # a hash collision on a block or a decoder bug: never write bad bytes
        raise ParityError(f"cannot repair {check.shard}: the rebuilt shard's sha256 {sha[:12]}… does not match "
                          f"the parity header's {header.shard_sha256[:12]}…")
    atomic_write_bytes(shard_path, rebuilt)
    return RepairResult(shard=check.shard, repaired=True, bad_data_blocks=check.bad_data_blocks,
                        bad_parity_blocks=check.bad_parity_blocks, k=header.k, m=header.m, sha256=sha)
