"""``ctx-rans`` (v2): a static, neighbour-conditioned model per dataset + one rANS stream per chunk.

Why: neighbouring tokens repeat (a token equals its up / left neighbour ~30% of the time) and
a token's id depends on its up neighbour's id, which a general-purpose compressor (zstd, gzip)
barely exploits. Each token is coded in raster order as two rANS symbols:

1. an *event*: copy up, copy left, copy up-left, copy up-right (the first neighbour that
   matches, in that order), or literal; its distribution is conditioned on which neighbours
   equal each other and on the borders (``EVENT_CONTEXTS`` contexts);
2. for a literal only, the id, from a product of two experts: ``P(id | cluster(up)) *
   P(id | cluster(left)) / P(id)``, renormalised. Each neighbour's id maps to one of
   a few clusters (chosen per dataset), fitted so that ids with similar successors share a table. Each expert
   alone costs about 0.5 bit more per literal than the product (measured on k-means and VQ ids).

The model (two cluster maps, two sets of frequency tables and the literal marginal, a few KB)
is fitted once from a sample of the dataset's ids and stored in the dataset dir as
``MODEL_FILE``; every table entry is at least 1, so ids never seen when fitting still
round-trip. The product tables are built from the stored integers with integer arithmetic only,
so every machine derives bit-identical tables (float exp/log differ by an ulp across SIMD code
paths, and one ulp would break decoding). Model version 1 (one expert, ``P(id | cluster(up))``)
still loads. The coder is a 32-bit rANS with 16-bit words (ryg_rans layout), compiled with numba
since every token depends on its decoded neighbours; one stream per chunk costs 4 bytes of final
state.

Payload: header ``<4sBHHIHII`` (magic, version, H, W, n, K, model fingerprint, crc32 of the
words), then the uint16 words. The fingerprint names the model a chunk was coded with, so a
chunk decoded under another model fails loudly instead of yielding wrong ids.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from pathlib import Path

import numba
import numpy as np
from safetensors.numpy import load, save

from seit.data.codec_base import Codec, CodecError, check_shape
from seit.utils.io import atomic_write_bytes, canonical_safetensors

NAME = "ctx-rans"
MODEL_FILE = "codec_model.safetensors"
EVENTS = 5  # copy up, copy left, copy up-left, copy up-right, literal
LITERAL = 4
EVENT_CONTEXTS = 128  # 5 equality bits between neighbours x 2 border bits
EVENT_BITS, LITERAL_BITS = 12, 14  # frequency precision of the two tables (<= 16 for 16-bit words)
# Clusters per expert, chosen per dataset by description length (model bytes + coded bytes):
# more clusters fit the ids better but cost a K-entry table each, which small datasets can't repay.
CLUSTER_CHOICES = (4, 8, 16, 32)
_FIT_ITERS = 15
_HEADER = struct.Struct("<4sBHHIHII")
_MAGIC, _VERSION = b"SCTX", 1  # payload layout; the model has its own version
_MODEL_VERSION = 2
_RANS_L = 1 << 16


# --- model ------------------------------------------------------------------------------------
def _neighbours(ids: np.ndarray) -> tuple[np.ndarray, ...]:
    """up, left, up-left, up-right of every token, -1 outside the grid."""
    n, h, w = ids.shape
    pad = np.full((n, h + 1, w + 2), -1, np.int64)
    pad[:, 1:, 1:-1] = ids
    return pad[:, :-1, 1:-1], pad[:, 1:, :-2], pad[:, :-1, :-2], pad[:, :-1, 2:]


def _events(ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per token: event, event context and the two literal references; mirrors the kernels.

    The up reference is the up id, else the left one, else K; the left reference is the left id,
    else the up one, else K.
    """
    x = ids.astype(np.int64)
    up, le, ul, ur = _neighbours(x)
    event = np.full(x.shape, LITERAL)
    for e, cand in reversed(list(enumerate((up, le, ul, ur)))):
        event[x == cand] = e
    ctx = ((le == up) * 1 + (ul == up) * 2 + (ur == up) * 4 + (ul == le) * 8 + (ur == le) * 16
           + (up < 0) * 32 + (le < 0) * 64)
    up_ref = np.where(up >= 0, up, np.where(le >= 0, le, k))
    left_ref = np.where(le >= 0, le, np.where(up >= 0, up, k))
    return event, ctx, up_ref, left_ref


def _quantise(counts: np.ndarray, bits: int) -> np.ndarray:
    """Rows of counts -> integer frequencies >= 1 summing to exactly 2**bits (deterministic)."""
    total, m = counts.shape[1], 1 << bits
    if total > m // 2:
        raise ValueError(f"{total} symbols do not fit a {bits}-bit frequency table")
    p = counts / np.maximum(counts.sum(1, keepdims=True), 1e-300)
    freq = 1 + np.floor(p * (m - total)).astype(np.int64)
    short = m - freq.sum(1)
    order = np.argsort(-(p * (m - total) - np.floor(p * (m - total))), axis=1, kind="stable")
    for r in range(len(freq)):  # hand the rounding remainder to the largest fractional parts
        freq[r, order[r, : short[r]]] += 1
    return freq.astype(np.uint16)


def _quantise_int(weights: np.ndarray, bits: int) -> np.ndarray:
    """Like _quantise, for int64 weights and with integer arithmetic only, so that every machine agrees."""
    total, m = weights.shape[1], 1 << bits
    scaled = weights * (m - total)
    sums = np.maximum(weights.sum(1, keepdims=True), 1)
    freq = 1 + scaled // sums
    short = m - freq.sum(1)
    order = np.argsort(-(scaled % sums), axis=1, kind="stable")
    for r in range(len(freq)):
        freq[r, order[r, : short[r]]] += 1
    return freq


def _product_tables(freq_up: np.ndarray, freq_left: np.ndarray, marginal: np.ndarray) -> np.ndarray:
    """[Cu*Cl, K] frequencies of P(id | up cluster) * P(id | left cluster) / P(id), integers only."""
    fu, fl, fm = (a.astype(np.int64) for a in (freq_up, freq_left, marginal))
    weights = (fu[:, None, :] * fl[None, :, :] << 16) // fm  # < 2**44: no overflow in the quantiser
    return _quantise_int(weights.reshape(-1, fu.shape[1]), LITERAL_BITS)


def _fit_clusters(counts: np.ndarray, clusters: int) -> np.ndarray:
    """Hard-cluster context tokens (rows of successor counts) by maximum likelihood, k-means style."""
    seeds = np.argsort(-counts.sum(1), kind="stable")[:clusters]
    tables = counts[seeds] + 0.1
    assign = np.zeros(len(counts), np.int64)
    for _ in range(_FIT_ITERS):
        logp = np.log(tables / tables.sum(1, keepdims=True))
        assign = np.argmax(counts @ logp.T, axis=1)
        tables = np.zeros((clusters, counts.shape[1]))
        np.add.at(tables, assign, counts)
        tables += 0.1
    return assign


def _fit_expert(refs: np.ndarray, ids: np.ndarray, k: int, clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """Cluster map [K+1] and quantised tables [clusters, K] of P(id | cluster(ref))."""
    succ = np.zeros((k + 1, k))
    np.add.at(succ, (refs, ids), 1)
    assign = _fit_clusters(succ, clusters)
    tables = np.zeros((clusters, k))
    np.add.at(tables, assign, succ)
    return assign.astype(np.uint8), _quantise(tables + 0.01, LITERAL_BITS)


class CtxModel:
    """The fitted tables; ``fingerprint`` ties coded chunks to the exact model that coded them.

    ``tables`` holds the stored arrays: ``event_freq``, ``cluster_up``, ``freq_up``,
    ``cluster_left``, ``freq_left``, ``marginal`` (version 2), or ``event_freq``, ``cluster``,
    ``literal_freq`` (version 1).
    """

    V2 = ("cluster_up", "freq_up", "cluster_left", "freq_left", "marginal", "event_freq")
    V1 = ("cluster", "event_freq", "literal_freq")  # this order is hashed: v1 chunks keep their fingerprint

    def __init__(self, codebook_size: int, tables: dict[str, np.ndarray]):
        k = codebook_size
        names = self.V2 if "marginal" in tables else self.V1
        missing = [n for n in names if n not in tables]
        if missing:
            raise ValueError(f"codec model lacks tables {missing}")
        self.tables = {n: np.asarray(tables[n]).astype(np.uint8 if n.startswith("cluster") else np.uint16)
                       for n in names}
        self.version = 2 if names is self.V2 else 1
        t = self.tables
        if self.version == 2:
            cu, fu, cl, fl = t["cluster_up"], t["freq_up"], t["cluster_left"], t["freq_left"]
            literal_rows = [fu, fl, t["marginal"][None]]
        else:
            cu, fu, cl, fl = t["cluster"], t["literal_freq"], np.zeros(k + 1, np.uint8), None
            literal_rows = [fu]
        if cu.shape != (k + 1,) or cl.shape != (k + 1,) or t["event_freq"].shape != (EVENT_CONTEXTS, EVENTS) or \
                any(r.shape[1] != k for r in literal_rows):
            raise ValueError(f"codec model tables {({n: a.shape for n, a in t.items()})} do not fit codebook size {k}")
        if (cu >= len(fu)).any() or (fl is not None and (cl >= len(fl)).any()) or \
                any((a == 0).any() for a in [t["event_freq"], *literal_rows]):
            raise ValueError("codec model tables are inconsistent (cluster out of range or a zero frequency)")
        if (t["event_freq"].astype(np.int64).sum(1) != 1 << EVENT_BITS).any() or \
                any((r.astype(np.int64).sum(1) != 1 << LITERAL_BITS).any() for r in literal_rows):
            raise ValueError("codec model frequency rows do not sum to their precision")
        self.codebook_size = k
        h = hashlib.sha256(struct.pack("<I", k))
        for n in names if self.version == 1 else ("event_freq", *self.V2):
            h.update(np.ascontiguousarray(t[n]).astype("<u2").tobytes())
        self.fingerprint = int.from_bytes(h.digest()[:4], "little")
        # kernel tables: one literal table per (up cluster, left cluster) pair, cumulative starts,
        # and a slot -> symbol lookup
        literal = _product_tables(fu, fl, t["marginal"]) if self.version == 2 else fu.astype(np.int64)
        self._left_clusters = 1 if fl is None else len(fl)
        self._ev_cum = np.concatenate([np.zeros((EVENT_CONTEXTS, 1), np.int64),
                                       t["event_freq"].astype(np.int64).cumsum(1)], 1)
        self._lit_cum = np.concatenate([np.zeros((len(literal), 1), np.int64), literal.cumsum(1)], 1)
        self._lit_lut = np.stack([np.repeat(np.arange(k, dtype=np.uint16), f) for f in literal])
        self._cluster_up, self._cluster_left = cu.astype(np.int64), cl.astype(np.int64)

    @classmethod
    def fit(cls, ids: np.ndarray, codebook_size: int, clusters: int | None = None,
            total_samples: int | None = None) -> "CtxModel":
        """Fit from a sample of id grids [n, H, W] (any n >= 0; no data gives flat tables).

        ``clusters`` per expert; None picks from ``CLUSTER_CHOICES`` the smallest model file plus
        the sample's coded bytes scaled to ``total_samples`` (the dataset size; default n).
        """
        k = codebook_size
        if ids.ndim != 3:
            raise ValueError(f"ids must be [n, H, W], got shape {ids.shape}")
        _check_range(ids, k)
        if clusters is None:
            scale = (total_samples or len(ids)) / max(len(ids), 1)
            fits = [cls.fit(ids, k, c) for c in CLUSTER_CHOICES if c <= k + 1] or [cls.fit(ids, k, 1)]
            return min(fits, key=lambda m: len(m.to_bytes()) + scale * len(encode_ctx(m, ids, k)))
        event, ctx, up_ref, left_ref = _events(ids, k)
        ev_counts = np.zeros((EVENT_CONTEXTS, EVENTS))
        np.add.at(ev_counts, (ctx.ravel(), event.ravel()), 1)
        lit = event.ravel() == LITERAL
        x = ids.ravel()[lit].astype(np.int64)
        clusters = max(1, min(clusters, k + 1))
        cluster_up, freq_up = _fit_expert(up_ref.ravel()[lit], x, k, clusters)
        cluster_left, freq_left = _fit_expert(left_ref.ravel()[lit], x, k, clusters)
        marginal = _quantise(np.bincount(x, minlength=k)[None] + 0.01, LITERAL_BITS)[0]
        return cls(k, {"event_freq": _quantise(ev_counts + 0.01, EVENT_BITS), "cluster_up": cluster_up,
                       "freq_up": freq_up, "cluster_left": cluster_left, "freq_left": freq_left, "marginal": marginal})

    def to_bytes(self) -> bytes:
        """The model as a safetensors file, with a sorted header: the same model gives the same bytes."""
        return canonical_safetensors(save(self.tables, metadata={"codec": NAME, "version": str(self.version),
                                                                 "codebook_size": str(self.codebook_size)}))

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "codec model") -> "CtxModel":
        try:
            tensors = load(data)
            return cls(len(tensors["cluster_up" if "cluster_up" in tensors else "cluster"]) - 1, tensors)
        except Exception as exc:  # a bad header raises safetensors' own error type, not a ValueError
            raise CodecError(f"{where} is not a valid {NAME} model: {exc}") from exc

    def save(self, path: str | os.PathLike) -> str:
        """Write atomically; returns the file's sha256."""
        data = self.to_bytes()
        atomic_write_bytes(path, data)
        return hashlib.sha256(data).hexdigest()


def load_model(model_dir: str | os.PathLike) -> CtxModel:
    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise CodecError(f"{path} not found: datasets coded with {NAME} keep their model there")
    return CtxModel.from_bytes(path.read_bytes(), str(path))


# --- kernels ----------------------------------------------------------------------------------
@numba.njit(cache=True, nogil=True)
def _context(g, i, j, w):
    """(event context, up, left, up-left, up-right) of token (i, j) of the flat grid g."""
    up = g[(i - 1) * w + j] if i > 0 else -1
    le = g[i * w + j - 1] if j > 0 else -1
    ul = g[(i - 1) * w + j - 1] if i > 0 and j > 0 else -1
    ur = g[(i - 1) * w + j + 1] if i > 0 and j + 1 < w else -1
    ctx = ((le == up) * 1 + (ul == up) * 2 + (ur == up) * 4 + (ul == le) * 8 + (ur == le) * 16
           + (up < 0) * 32 + (le < 0) * 64)
    return ctx, up, le, ul, ur


@numba.njit(cache=True, nogil=True)
def _literal_table(up, le, k, cluster_up, cluster_left, left_clusters):
    """Row of the literal tables for a token: (cluster of up, else left) x (cluster of left, else up)."""
    up_ref = up if up >= 0 else (le if le >= 0 else k)
    left_ref = le if le >= 0 else (up if up >= 0 else k)
    return cluster_up[up_ref] * left_clusters + cluster_left[left_ref]


@numba.njit(cache=True, nogil=True)
def _encode_kernel(ids, h, w, k, ev_cum, lit_cum, cluster_up, cluster_left, left_clusters):
    n = ids.shape[0]
    t = h * w
    starts = np.empty(2 * n * t, np.int64)
    freqs = np.empty(2 * n * t, np.int64)
    bits = np.empty(2 * n * t, np.int64)
    m = 0
    for s in range(n):
        g = ids[s].ravel().astype(np.int64)
        for i in range(h):
            for j in range(w):
                x = g[i * w + j]
                ctx, up, le, ul, ur = _context(g, i, j, w)
                e = 4
                if x == up:
                    e = 0
                elif x == le:
                    e = 1
                elif x == ul:
                    e = 2
                elif x == ur:
                    e = 3
                starts[m], freqs[m], bits[m] = ev_cum[ctx, e], ev_cum[ctx, e + 1] - ev_cum[ctx, e], EVENT_BITS
                m += 1
                if e == 4:
                    c = _literal_table(up, le, k, cluster_up, cluster_left, left_clusters)
                    starts[m], freqs[m], bits[m] = lit_cum[c, x], lit_cum[c, x + 1] - lit_cum[c, x], LITERAL_BITS
                    m += 1
    out = np.empty(m + 2, np.uint16)  # at most one word per symbol, plus the final state
    o = out.shape[0]
    state = np.int64(1 << 16)
    for q in range(m - 1, -1, -1):
        f = freqs[q]
        x_max = ((np.int64(1 << 16) >> bits[q]) << 16) * f
        if state >= x_max:
            o -= 1
            out[o] = state & 0xFFFF
            state >>= 16
        state = ((state // f) << bits[q]) + (state % f) + starts[q]
    out[o - 1] = state >> 16
    out[o - 2] = state & 0xFFFF
    return out[o - 2 :].copy()


@numba.njit(cache=True, nogil=True)
def _refill(state, words, p):
    """rANS renormalisation: pull in the next 16-bit word when the state drops below 2**16.

    Returns p = len(words) + 1 when the stream runs out, which the caller reports as truncated.
    """
    if state < (1 << 16):
        if p >= len(words):
            return state, len(words) + 1
        state = (state << 16) | words[p]
        p += 1
    return state, p


@numba.njit(cache=True, nogil=True)
def _decode_kernel(words, n, h, w, k, ev_cum, lit_cum, lit_lut, cluster_up, cluster_left, left_clusters, out):
    """Fills out[n, H*W]; returns 0, or 1 if the stream ran short, 2 if it does not end where it began."""
    nw = words.shape[0]
    if nw < 2:
        return 1
    state = np.int64(words[0]) | (np.int64(words[1]) << 16)
    p = 2
    for s in range(n):
        g = out[s]
        for i in range(h):
            for j in range(w):
                ctx, up, le, ul, ur = _context(g, i, j, w)
                slot = state & ((1 << EVENT_BITS) - 1)
                e = 0
                while ev_cum[ctx, e + 1] <= slot:
                    e += 1
                state = (ev_cum[ctx, e + 1] - ev_cum[ctx, e]) * (state >> EVENT_BITS) + slot - ev_cum[ctx, e]
                state, p = _refill(state, words, p)
                if p > nw:
                    return 1
                if e == 0:
                    x = up
                elif e == 1:
                    x = le
                elif e == 2:
                    x = ul
                elif e == 3:
                    x = ur
                else:
                    c = _literal_table(up, le, k, cluster_up, cluster_left, left_clusters)
                    slot = state & ((1 << LITERAL_BITS) - 1)
                    x = np.int64(lit_lut[c, slot])
                    state = (lit_cum[c, x + 1] - lit_cum[c, x]) * (state >> LITERAL_BITS) + slot - lit_cum[c, x]
                    state, p = _refill(state, words, p)
                    if p > nw:
                        return 1
                if x < 0:  # a copy from outside the grid: only a corrupt stream asks for one
                    return 2
                g[i * w + j] = x
    return 0 if (state == (1 << 16) and p == nw) else 2


# --- codec ------------------------------------------------------------------------------------
def _check_range(ids: np.ndarray, k: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= k):
        raise ValueError(f"ids out of range [0, {k}): min {ids.min()}, max {ids.max()}")


def encode_ctx(model: CtxModel, ids: np.ndarray, codebook_size: int) -> bytes:
    if ids.ndim != 3:
        raise ValueError(f"ids must be [n, H, W], got shape {ids.shape}")
    if codebook_size != model.codebook_size:
        raise ValueError(f"codec model is for codebook size {model.codebook_size}, not {codebook_size}")
    _check_range(ids, codebook_size)
    n, h, w = ids.shape
    words = _encode_kernel(np.ascontiguousarray(ids, dtype=np.int64).reshape(n, h * w), h, w, codebook_size,
                           model._ev_cum, model._lit_cum, model._cluster_up, model._cluster_left, model._left_clusters)
    body = words.astype("<u2").tobytes()
    return _HEADER.pack(_MAGIC, _VERSION, h, w, n, codebook_size % 65536, model.fingerprint, zlib.crc32(body)) + body


def decode_ctx(model: CtxModel, payload: bytes, shape: tuple[int, int, int] | None = None) -> np.ndarray:
    if len(payload) < _HEADER.size:
        raise CodecError(f"payload of {len(payload)} bytes is shorter than the {NAME} header")
    magic, version, h, w, n, k, fingerprint, crc = _HEADER.unpack_from(payload)
    if magic != _MAGIC or version != _VERSION:
        raise CodecError(f"bad {NAME} header (magic={magic!r}, version={version})")
    check_shape((n, h, w), shape)
    if fingerprint != model.fingerprint or k != model.codebook_size % 65536:
        raise CodecError(f"chunk was coded with {NAME} model {fingerprint:08x} (K={k}), but the dataset's model is "
                         f"{model.fingerprint:08x} (K={model.codebook_size}): wrong or replaced {MODEL_FILE}")
    body = payload[_HEADER.size :]
    if len(body) % 2 or zlib.crc32(body) != crc:
        raise CodecError(f"{NAME} stream is corrupt or truncated (checksum mismatch, {len(body)} bytes)")
    out = np.zeros((n, h * w), np.int64)
    status = _decode_kernel(np.frombuffer(body, "<u2").astype(np.int64), n, h, w, model.codebook_size,
                            model._ev_cum, model._lit_cum, model._lit_lut, model._cluster_up, model._cluster_left,
                            model._left_clusters, out)
    if status:
        raise CodecError(f"{NAME} stream of {len(body)} bytes does not decode to [{n},{h},{w}] "
                         f"({'ran short' if status == 1 else 'inconsistent end state'})")
    return out.astype(np.uint16).reshape(n, h, w)


def load_codec(model_dir: str | os.PathLike | None) -> Codec:
    """The ``ctx-rans`` codec bound to the model in model_dir (the dataset dir)."""
    if model_dir is None:
        raise ValueError(f"codec {NAME!r} needs its model: pass model_dir, the dataset dir holding {MODEL_FILE}")
    model = load_model(model_dir)
    return Codec(NAME, lambda ids, k: encode_ctx(model, ids, k), lambda payload, shape=None: decode_ctx(model, payload, shape))
