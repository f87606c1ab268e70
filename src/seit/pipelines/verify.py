"""``task=verify``: scrub a token dataset, and with ``repair=true`` rebuild what is damaged.

The shards may be the only copy of the data, so a scrub decodes every chunk of every split
through the one reader's checks (size, sha256, strict tar, counts, ids < K, labels), checks the
listing (missing, unlisted and miscounted shards), the codebook's fingerprint, the codec model
and the synonym table, and prints one row per shard. It exits non-zero on any fault, naming each
bad shard and chunk.

Repair rebuilds each bad shard from its parity file when the dataset has them
(``data.build.parity``), else from the source images when they still exist, and accepts the
result only when its sha256 is the one dataset.json records; then it scrubs again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from seit.data.chunk import decode_chunk
from seit.data.codec import CodecError
from seit.data.dataset_info import DatasetError, ShardSpec, TokenDatasetInfo, listing_problems
from seit.data.shard_reader import ShardReadError, check_values, read_chunks, tar_members
from seit.utils.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class ShardReport:
    split: str
    name: str
    samples: int
    chunks: int
    faults: list[str] = field(default_factory=list)
    repaired: str | None = None  # "parity" or "source" once rebuilt

    @property
    def ok(self) -> bool:
        return not self.faults


def scrub_shard(spec: ShardSpec, codec) -> ShardReport:
    """Every fault of one shard: the reader's first error, then each chunk that does not decode."""
    name = Path(spec.path).name
    report = ShardReport(spec.split, name, spec.count, spec.num_chunks)
    try:
        for _ in read_chunks(spec, codec):
            pass
        return report
    except ShardReadError as exc:
        report.faults.append(_short(str(exc), spec))
    if not Path(spec.path).is_file():
        return report
    # Name the damaged chunks: parse what still parses, without the file-level checks.
    data, stem = Path(spec.path).read_bytes(), name.rsplit(".", 1)[0]
    try:
        for index, (member, payload) in enumerate(tar_members(data, spec.path)):
            where = f"chunk {index} ({member})"
            if index >= spec.num_chunks:
                report.faults.append(f"{where}: beyond the {spec.num_chunks} chunks the count implies")
                continue
            try:
                check_values(decode_chunk(payload, codec, n=spec.chunk_count(index), grid=spec.grid), spec, where)
            except (CodecError, ShardReadError) as exc:
                report.faults.append(f"{where}: {_short(str(exc), spec)}")
            if member != f"{stem}-{index:05d}.tokens":
                report.faults.append(f"{where}: unexpected member name")
    except ShardReadError as exc:
        report.faults.append(_short(str(exc), spec))
    return report


def _short(message: str, spec: ShardSpec) -> str:
    """The reader's message without its advice and the shard's path (the table's row names it)."""
    return message.split("; scrub the dataset")[0].replace(f"shard {spec.path}", "the shard").replace(spec.path, "the shard")


def scrub(info: TokenDatasetInfo) -> tuple[list[str], list[ShardReport]]:
    """(dataset-level faults, one report per listed shard)."""
    faults = list(listing_problems(info.root, info.meta))
    try:
        info.load_codebook()
    except DatasetError as exc:
        faults.append(str(exc))
    if info.meta.get("synonyms_file"):
        try:
            info.load_synonyms()
        except (DatasetError, OSError, ValueError) as exc:
            faults.append(f"synonym table: {exc}")
    try:
        codec = info.load_codec()
    except (OSError, ValueError) as exc:  # a missing or damaged codec model: no shard can be decoded
        return [*faults, f"codec {info.codec!r} cannot be loaded: {exc}"], []
    reports = []
    for shard in tqdm(info.meta["shards"], desc="verify", unit="shard", disable=None):
        report = scrub_shard(info.spec(shard), codec)
        if shard.get("parity") and report.ok:
            report.faults += parity_faults(info, shard)
        reports.append(report)
    return faults, reports


def parity_faults(info: TokenDatasetInfo, shard: dict) -> list[str]:
    """A missing, damaged or stale parity file of an intact shard (repair rewrites it)."""
    from seit.data.parity import check_parity, parity_path_for

    check = check_parity(info.spec(shard).path, parity_path_for(info.root, shard["name"]), shard["sha256"])
    if check.problem or check.bad_parity_blocks or not check.header_ok:
        return [f"parity file {Path(check.parity).name}: {check.problem or f'{check.bad_parity_blocks} damaged blocks'}"]
    return []


def repair(info: TokenDatasetInfo, bad: list[ShardReport]) -> None:
    """Rebuild bad shards from parity, else from the source images; each must match its recorded sha256.
    A parity file that is missing or damaged is written again from its (intact or repaired) shard."""
    from seit.data.parity import ParityError, parity_path_for, repair_shard, write_parity

    shards = {s["name"]: s for s in info.meta["shards"]}
    need_source = []
    for report in bad:
        shard = shards[report.name]
        if report.faults[0].startswith("parity file"):  # the shard itself scrubbed clean
            continue
        if shard.get("parity"):
            try:
                repair_shard(info.spec(shard).path, parity_path_for(info.root, shard["name"]), shard["sha256"])
                report.repaired = "parity"
                continue
            except (ParityError, OSError) as exc:
                log.warning("%s: parity cannot repair it (%s); trying the source images", report.name, exc)
        need_source.append(report)
    if need_source:
        from seit.pipelines.tokenize import rebuild_shards

        rebuild_shards(info.root, [r.name for r in need_source])
        for report in need_source:
            report.repaired = "source"
    for report in bad:
        shard = shards[report.name]
        if shard.get("parity") and parity_faults(info, shard):
            p = shard["parity"]
            write_parity(info.spec(shard).path, parity_path_for(info.root, shard["name"]), p["fraction"], p.get("block_size"))
            report.repaired = report.repaired or "a new parity file"


def table(faults: list[str], reports: list[ShardReport]) -> str:
    """A Markdown table: one row per shard, then the dataset-level faults."""
    rows = ["| split | shard | samples | chunks | status |", "|---|---|---:|---:|---|"]
    for r in reports:
        status = "ok" if r.ok else "; ".join(r.faults[:4]) + (f" (+{len(r.faults) - 4} more)" if len(r.faults) > 4 else "")
        if r.repaired:
            status = f"repaired from {r.repaired} ({status})"
        rows.append(f"| {r.split} | {r.name} | {r.samples} | {r.chunks} | {status.replace('|', '/')} |")
    rows += [f"\n**dataset:** {f}" for f in faults]
    return "\n".join(rows)


def verify(cfg) -> dict:
    """Scrub data.root (and repair it with ``repair=true``); raises DatasetError on any fault left."""
    info = TokenDatasetInfo.open(cfg.data.root, check=False)
    faults, reports = scrub(info)
    repaired = []
    if cfg.get("repair") and (bad := [r for r in reports if not r.ok]):
        repair(info, bad)
        repaired = [(r.name, r.repaired) for r in bad]
        faults, reports = scrub(TokenDatasetInfo.open(cfg.data.root, check=False))
        for r in reports:
            r.repaired = dict(repaired).get(r.name)
    bad = [r for r in reports if not r.ok]
    text = table(faults, reports)
    print(text, flush=True)
    out = Path(cfg.paths.output_dir)
    summary = {"task": "verify", "dataset": str(info.root), "shards": len(reports), "bad_shards": [r.name for r in bad],
               "faults": faults + [f"{r.name}: {f}" for r in bad for f in r.faults], "repaired": dict(repaired),
               "samples": sum(r.samples for r in reports), "output_dir": str(out)}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_bytes(out / "verify.md", (text + "\n").encode())
    n = len(faults) + sum(len(r.faults) for r in bad)
    if n:
        names = ", ".join(r.name for r in bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        raise DatasetError(f"{info.root}: {n} fault(s) in {len(bad)} of {len(reports)} shards"
                           f"{': ' + names if bad else ''}{'; ' + faults[0] if faults else ''} (table: {out / 'verify.md'})"
                           + ("" if cfg.get("repair") else "; `repair=true` rebuilds damaged shards"))
    print(f"verified {info.root}: {len(reports)} shards, {summary['samples']} samples, no fault"
          + (f"; repaired {len(repaired)}" if repaired else ""), flush=True)
    return summary
