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
from seit.data.dataset_info import (CODEBOOK_FILE, INFO_FILE, DatasetError, ShardSpec, TokenDatasetInfo, listing_problems,
                                    SYNONYMS_FILE, save_codebook, save_synonyms, seal, upgraded_meta,
                                    write_dataset_info)
from seit.data.shard_reader import ShardReadError, check_values, read_chunks, tar_members
from seit.utils.io import atomic_write_bytes, atomic_write_json, sha256_file

log = logging.getLogger(__name__)
# dataset.json fields that write_dataset_info derives itself
DERIVED_FIELDS = ("format", "version", "num_samples", "splits", "shards", "codebook_dim", "bytes_on_disk",
                  "bytes_per_sample", "percent_of_source", "file_sha256", "meta_sha256")
# Files repair can rewrite ("" = no advice needed), and what to say of the others.
REPAIRABLE_FILES = {CODEBOOK_FILE: "", SYNONYMS_FILE: ""}
UNREPAIRABLE = (" (repair cannot rebuild it: restore it from a backup, or tokenize the source images again "
                "under another data.root)")


@dataclass
class ShardReport:
    split: str
    name: str
    samples: int
    chunks: int
    faults: list[str] = field(default_factory=list)
    repaired: str | None = None  # how it was rebuilt: "parity", "source", "a rename", "a new parity file"
    swapped_with: str | None = None  # the listed shard whose recorded sha256 this file has

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


def file_faults(info: TokenDatasetInfo) -> dict[str, str]:
    """{file name: fault} for the files beside dataset.json: their recorded sha256, the codebook's
    fingerprint, the synonym table's shape and values."""
    faults = {}
    for name, recorded in info.meta.get("file_sha256", {}).items():
        path = info.root / name
        if not path.is_file():
            faults[name] = f"{name} is missing"
        elif sha256_file(path) != recorded:
            faults[name] = f"{name} has another sha256 than dataset.json records (damaged or replaced)"
    checks = [(CODEBOOK_FILE, info.load_codebook)]
    if info.meta.get("synonyms_file"):
        checks.append((info.meta["synonyms_file"], info.load_synonyms))
    for name, load in checks:
        if name not in faults:
            try:
                load()
            except DatasetError as exc:
                faults[name] = str(exc)
    return faults


def scrub(info: TokenDatasetInfo) -> tuple[list[str], list[ShardReport]]:
    """(dataset-level faults, one report per listed shard)."""
    faults = list(listing_problems(info.root, info.meta))
    if "meta_sha256" in info.meta and seal(info.meta) != info.meta["meta_sha256"]:
        faults.insert(0, f"{INFO_FILE} does not match its own checksum: it was edited or damaged after it was "
                         "written (restore it from a backup)")
    files = file_faults(info)
    faults += [f"{fault}{REPAIRABLE_FILES.get(name, UNREPAIRABLE)}" for name, fault in files.items()]
    try:
        codec = info.load_codec()
    except (OSError, ValueError) as exc:  # a missing or damaged codec model: no shard can be decoded
        return [*faults, f"codec {info.codec!r} cannot be loaded, so no shard can be decoded: {exc}"], []
    recorded = {s["sha256"]: s["name"] for s in info.meta["shards"] if s.get("sha256")}
    reports = []
    for shard in tqdm(info.meta["shards"], desc="verify", unit="shard", disable=None):
        spec = info.spec(shard)
        report = scrub_shard(spec, codec)
        if not report.ok and Path(spec.path).is_file():
            other = recorded.get(sha256_file(spec.path))
            if other and other != shard["name"]:
                report.faults.insert(0, f"holds exactly what dataset.json records for {other}: renamed or swapped")
                report.swapped_with = other
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
    """Rebuild bad shards: renamed or swapped files are put back under their names, then each
    other one comes from parity, else from the source images, and must match its recorded sha256.
    A parity file that is missing or damaged is written again from its (intact or repaired) shard."""
    from seit.data.parity import ParityError, parity_path_for, repair_shard, write_parity

    shards = {s["name"]: s for s in info.meta["shards"]}
    renames = {r.swapped_with: r for r in bad if r.swapped_with}
    if renames:  # through temp names, so that a swap of two files loses neither
        tmp = {name: Path(info.spec(shards[r.name]).path).with_name(f".{r.name}.swap") for name, r in renames.items()}
        for name, r in renames.items():
            Path(info.spec(shards[r.name]).path).rename(tmp[name])
        for name, r in renames.items():
            tmp[name].rename(info.spec(shards[name]).path)
            r.repaired = r.repaired or "a rename"
    need_source = []
    for report in bad:
        shard = shards[report.name]
        if report.faults[0].startswith("parity file") or report.swapped_with or report.name in renames:
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
        from seit.pipelines.tokenize_rebuild import rebuild_shards

        rebuild_shards(info.root, [r.name for r in need_source])
        for report in need_source:
            report.repaired = "source"
    for report in bad:
        shard = shards[report.name]
        if shard.get("parity") and parity_faults(info, shard):
            p = shard["parity"]
            write_parity(info.spec(shard).path, parity_path_for(info.root, shard["name"]), p["fraction"], p.get("block_size"))
            report.repaired = report.repaired or "a new parity file"


def repair_files(info: TokenDatasetInfo, names: list[str]) -> list[str]:
    """Rewrite a damaged codebook from the tokenizer that built the dataset (its fingerprint must be the
    recorded one), and a damaged synonym table from the codebook; returns the files rewritten."""
    from seit.pipelines.tokenize_rebuild import built_tokenizer
    from seit.tokenizers.codebook_tools import synonyms

    done = []
    if CODEBOOK_FILE in names:
        save_codebook(info.root / CODEBOOK_FILE, built_tokenizer(info.root, info.meta).codebook)
        done.append(CODEBOOK_FILE)
    name = info.meta.get("synonyms_file")
    if name in names:
        save_synonyms(info.root / name, synonyms(info.load_codebook(), int(info.meta["synonyms_k"])))
        done.append(name)
    return done


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


def add_parity(info: TokenDatasetInfo, fraction: float) -> int:
    """Write parity files for the shards of a clean dataset that lack them (or have another fraction),
    and record them in dataset.json (written again, atomically); returns how many were written."""
    from seit.data.parity import parity_path_for, write_parity

    if not 0 < fraction <= 1:
        raise ValueError(f"parity={fraction} must be a fraction in (0, 1]")
    meta, shards, written = info.meta, [], 0
    for shard in meta["shards"]:
        shard = dict(shard)
        if (shard.get("parity") or {}).get("fraction") != fraction:
            shard["parity"] = write_parity(info.spec(shard).path, parity_path_for(info.root, shard["name"]), fraction)
            written += 1
        shards.append(shard)
    if written:
        fields = {k: meta[k] for k in ("grid", "codebook_size", "codec", "chunk_size", "codebook_sha256", "classes",
                                       "source_bytes")}
        # a file written before a rename (embed_dim -> codebook_dim) is written again under the current names
        extra = {k: v for k, v in upgraded_meta(meta).items() if k not in (*fields, *DERIVED_FIELDS)}
        if "build" in extra:
            extra["build"] = {**extra["build"], "parity": float(fraction)}
        write_dataset_info(info.root, shards=shards, codebook_dim=info.codebook_dim, **fields, **extra)
    return written


def verify(cfg) -> dict:
    """Scrub data.root (and repair it with ``repair=true``); raises DatasetError on any fault left."""
    info = TokenDatasetInfo.open(cfg.data.root, check=False)
    faults, reports = scrub(info)
    repaired: dict[str, str] = {}
    sealed = not any(f.startswith(f"{INFO_FILE} does not match its own checksum") for f in faults)
    if cfg.get("repair") and not sealed:  # its recorded sizes and checksums are what a repair would be held to
        log.warning("not repairing %s: its dataset.json does not match its own checksum", info.root)
    elif cfg.get("repair"):
        bad = [r for r in reports if not r.ok]
        fixable = [name for name, fault in file_faults(info).items() if name in REPAIRABLE_FILES]
        for name in repair_files(info, fixable):
            repaired[name] = "rewritten"
        if bad:
            repair(info, bad)
            repaired.update({r.name: r.repaired for r in bad if r.repaired})
        if repaired:
            faults, reports = scrub(TokenDatasetInfo.open(cfg.data.root, check=False))
            for r in reports:
                r.repaired = repaired.get(r.name)
    bad = [r for r in reports if not r.ok]
    text = table(faults, reports)
    print(text, flush=True)
    out = Path(cfg.paths.output_dir)
    summary = {"task": "verify", "dataset": str(info.root), "shards": len(reports), "bad_shards": [r.name for r in bad],
               "faults": faults + [f"{r.name}: {f}" for r in bad for f in r.faults], "repaired": repaired,
               "samples": sum(r.samples for r in reports), "output_dir": str(out)}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_bytes(out / "verify.md", (text + "\n").encode())
    n = len(faults) + sum(len(r.faults) for r in bad)
    if n:
        names = ", ".join(r.name for r in bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        targets = [r.name for r in bad] + [name for name in file_faults(info) if name in REPAIRABLE_FILES]
        advice = (f"; `repair=true` tries to rebuild {', '.join(targets[:3])}{' and more' if len(targets) > 3 else ''} "
                  "(from parity, the source images or the tokenizer)") if targets and sealed and not cfg.get("repair") else ""
        raise DatasetError(f"{info.root}: {n} fault(s) in {len(bad)} of {len(reports)} shards"
                           f"{': ' + names if bad else ''}{'; ' + faults[0] if faults else ''} (table: {out / 'verify.md'})"
                           + advice)
    if cfg.get("parity"):
        summary["parity_written"] = add_parity(TokenDatasetInfo.open(cfg.data.root), float(cfg.parity))
        atomic_write_json(out / "summary.json", summary)
    print(f"verified {info.root}: {len(reports)} shards, {summary['samples']} samples, no fault"
          + (f"; repaired {len(repaired)}: {', '.join(sorted(repaired))}" if repaired else "")
          + (f"; parity written for {summary['parity_written']} shards" if cfg.get("parity") else ""), flush=True)
    return summary
