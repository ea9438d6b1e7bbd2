"""WebDataset shard sets: the sample format, the builder, and the checker.

A shard set is a directory with ``<split>-NNNNNN.tar`` files and a ``manifest.json`` written last
(a set without a manifest is incomplete). One sample per ref, keyed ``<dataset>_<split_by>_<ref_id>``:

- ``jpg``: the original image file, byte for byte;
- ``mask.png``: the target mask at the original resolution, 1-bit PNG;
- ``json``: ref_id, ann_id, image_id, category_id, category, sentences, groups (one per sentence: the
  expression group evaluation reports by, ``ppcr.data.refer.expression_group``), bbox [x, y, w, h],
  height, width, dataset, split_by, split.

Each split's manifest entry also says what the REFER file held, so that evaluation can tell a
complete split from a partial one (``ppcr.data.counts``) and training can leave out the images of
the evaluation splits (``ppcr.data.overlap``):

- ``source``: refs and expressions of the split in the refs file, before any rejection;
- ``rejected``: refs of the split rejected at build, and their expressions;
- ``blank_expressions``: empty expressions dropped from refs that were kept, so that
  source = written (``expressions``) + rejected + blank;
- ``image_ids``: the split's images (sorted, distinct) and ``image_refs``, refs written per image;
- ``groups``: expressions written per expression group (evaluation reports each group; sorted).

Shards hold no pickles. Building is deterministic: the same input gives byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import shutil
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ppcr.data.refer import (DATASET_SPLITS, ReferRecord, Rejection, load_refs, read_refer, refer_files,
                              segmentation_to_mask)
from ppcr.data.transforms import decode_image

FORMAT_VERSION = 2  # of manifest.json (load_manifest refuses another); 2: per-sentence "groups"
MANIFEST = "manifest.json"
REJECTED = "rejected.jsonl"
SAMPLE_FIELDS = ("jpg", "mask.png", "json")
JSON_FIELDS = ("ref_id", "ann_id", "image_id", "category_id", "category", "sentences", "groups", "bbox",
               "height", "width", "dataset", "split_by", "split")
FIXED_MTIME = 0  # tar member times, so that equal input gives equal bytes; an int: a float adds a PAX header per member


class SampleError(ValueError):
    """A shard sample that cannot be decoded; the message names what is wrong."""


# ---------------------------------------------------------------------------------------------
# Sample format
# ---------------------------------------------------------------------------------------------


def sample_key(dataset: str, split_by: str, ref_id: int) -> str:
    return f"{dataset}_{split_by}_{ref_id:08d}"


def encode_mask(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(bool)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def decode_sample(raw: dict) -> dict:
    """Raw shard sample (bytes per field) -> image (3, H, W) uint8, mask (H, W) uint8 {0,1}, meta."""
    key = raw.get("__key__", "?")
    missing = [f for f in SAMPLE_FIELDS if f not in raw]
    if missing:
        raise SampleError(f"sample {key}: missing field(s) {', '.join(missing)}")
    extra = sorted(f for f in raw if not f.startswith("__") and f not in SAMPLE_FIELDS)
    if extra:  # e.g. a .pyd or .pickle member, which other readers would unpickle: never decoded here
        raise SampleError(f"sample {key}: unexpected member(s) {', '.join(extra)} (a shard sample holds only "
                          f"{', '.join(SAMPLE_FIELDS)})")
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise SampleError(f"sample {key}: json does not parse ({e})") from e
    if not isinstance(meta, dict) or any(f not in meta for f in JSON_FIELDS):
        lacking = [f for f in JSON_FIELDS if not isinstance(meta, dict) or f not in meta]
        raise SampleError(f"sample {key}: json lacks field(s) {', '.join(lacking)}")
    if not meta["sentences"] or not all(isinstance(s, str) and s.strip() for s in meta["sentences"]):
        raise SampleError(f"sample {key}: json field 'sentences' is empty or holds an empty expression")
    groups = meta["groups"]
    if not (isinstance(groups, list) and len(groups) == len(meta["sentences"]) and all(isinstance(g, str) for g in groups)):
        raise SampleError(f"sample {key}: json field 'groups' is not one string per sentence: {groups!r}")
    try:
        image = decode_image(raw["jpg"])
    except (RuntimeError, ValueError) as e:  # broken or empty data
        raise SampleError(f"sample {key}: jpg does not decode ({e})") from e
    try:
        mask = (decode_image(raw["mask.png"], gray=True)[0] > 0).to(torch.uint8)
    except (RuntimeError, ValueError) as e:
        raise SampleError(f"sample {key}: mask.png does not decode ({e})") from e
    h, w = int(meta["height"]), int(meta["width"])
    if tuple(image.shape[-2:]) != (h, w):
        raise SampleError(f"sample {key}: jpg is {image.shape[-1]}x{image.shape[-2]}, json says {w}x{h}")
    if tuple(mask.shape) != (h, w):
        raise SampleError(f"sample {key}: mask.png is {mask.shape[1]}x{mask.shape[0]}, json says {w}x{h}")
    bbox = meta["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and bbox[2] > 0 and bbox[3] > 0):
        raise SampleError(f"sample {key}: json field 'bbox' is not a non-empty [x, y, w, h]: {bbox!r}")
    return {"key": key, "image": image, "mask": mask, "meta": meta}


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


@dataclass
class _Job:
    record: ReferRecord
    dataset: str
    split_by: str
    refs_file: str  # named in rejections


def _encode_record(job: _Job) -> dict | Rejection:
    """Read and check one ref's image and mask; return the shard sample or the reason it is rejected."""
    rec = job.record
    try:
        data = Path(rec.image_path).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
            im.verify()
    except Exception as e:
        return Rejection(job.refs_file, rec.ref_id, "unreadable_image", f"unreadable image {rec.image_path} ({e})")
    if size != (rec.width, rec.height):
        return Rejection(job.refs_file, rec.ref_id, "image_size_mismatch",
                         f"image {rec.image_path} is {size[0]}x{size[1]}, instances.json says {rec.width}x{rec.height}")
    try:
        mask = segmentation_to_mask(rec.segmentation, rec.height, rec.width)
    except Exception as e:
        return Rejection(job.refs_file, rec.ref_id, "bad_segmentation", f"segmentation of annotation {rec.ann_id} unusable ({e})")
    if not mask.any():
        return Rejection(job.refs_file, rec.ref_id, "zero_area_mask", f"zero-area mask (annotation {rec.ann_id})")
    meta = {
        "ref_id": rec.ref_id, "ann_id": rec.ann_id, "image_id": rec.image_id, "category_id": rec.category_id,
        "category": rec.category, "sentences": rec.sentences, "groups": rec.groups, "bbox": rec.bbox,
        "height": rec.height, "width": rec.width, "dataset": job.dataset, "split_by": job.split_by, "split": rec.split,
        "file_name": Path(rec.image_path).name,
    }
    return {
        "__key__": sample_key(job.dataset, job.split_by, rec.ref_id),
        "jpg": data,
        "mask.png": encode_mask(mask),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


@dataclass
class ShardInfo:
    name: str
    samples: int = 0
    expressions: int = 0
    bytes: int = 0
    sha256: str = ""


@dataclass
class _ShardRoller:
    """Writes samples to ``<split>-NNNNNN.tar`` files, starting a new one at a count or size limit."""

    out: Path
    split: str
    max_samples: int
    max_bytes: int
    shards: list[ShardInfo] = field(default_factory=list)
    groups: dict[str, int] = field(default_factory=dict)  # expressions written per group
    _writer: wds.TarWriter | None = None
    _stream: object = None

    def write(self, sample: dict) -> None:
        size = sum(len(v) for k, v in sample.items() if not k.startswith("__"))
        cur = self.shards[-1] if self.shards else None
        if self._writer is None or cur.samples >= self.max_samples or (cur.bytes + size > self.max_bytes and cur.samples):
            self.close()
            self.shards.append(ShardInfo(name=f"{self.split}-{len(self.shards):06d}.tar"))
            self._stream = open(self.out / self.shards[-1].name, "wb")
            self._writer = wds.TarWriter(self._stream, mtime=FIXED_MTIME, user="ppcr", group="ppcr")
        self._writer.write(sample)
        info = self.shards[-1]
        info.samples += 1
        meta = json.loads(sample["json"])
        info.expressions += len(meta["sentences"])
        for g in meta["groups"]:
            self.groups[g] = self.groups.get(g, 0) + 1
        info.bytes += size

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._stream.close()
            self._writer = None
            info = self.shards[-1]
            path = self.out / info.name
            info.bytes = path.stat().st_size
            info.sha256 = sha256_file(path)


def _source_counts(refs_path: Path, valid_splits: tuple[str, ...],
                   splits: list[str] | None) -> tuple[dict[str, dict[str, int]], dict[int, tuple[str, int]]]:
    """Refs and expressions per split as the refs file holds them, before any check, and each such
    ref's (split, expressions) by ref_id, to attribute rejections to their split.

    Counted from the raw file rather than from the records read from it: a ref rejected for any
    reason still belongs to its split's published count."""
    counts: dict[str, dict[str, int]] = {}
    by_ref: dict[int, tuple[str, int]] = {}
    for ref in load_refs(refs_path):
        split = ref.get("split") if isinstance(ref, dict) else None
        if split not in valid_splits or (splits and split not in splits):
            continue  # an unknown split is rejected by read_refer and belongs to no split
        sentences = ref.get("sentences")
        n = len(sentences) if isinstance(sentences, list) else 0
        c = counts.setdefault(split, {"refs": 0, "expressions": 0})
        c["refs"] += 1
        c["expressions"] += n
        if isinstance(ref.get("ref_id"), int):
            by_ref[ref["ref_id"]] = (split, n)
    return counts, by_ref


def _split_entry(*, shards: list[ShardInfo], source: dict[str, int], rejected: list[tuple[str, int]],
                 image_refs: dict[int, int], groups: dict[str, int]) -> dict:
    """One split's manifest entry: what was written, what the refs file held and what was rejected
    (``rejected``: (split, expressions) of each rejected ref of the split)."""
    written = {"samples": sum(s.samples for s in shards), "expressions": sum(s.expressions for s in shards)}
    rejected_expressions = sum(n for _, n in rejected)
    ids = sorted(image_refs)
    return {
        **written,
        "bytes": sum(s.bytes for s in shards),
        "shards": [asdict(s) for s in shards],
        "source": dict(source),
        "rejected": {"refs": len(rejected), "expressions": rejected_expressions},
        "blank_expressions": source["expressions"] - written["expressions"] - rejected_expressions,
        "image_ids": ids,
        "image_refs": [image_refs[i] for i in ids],
        "groups": dict(sorted(groups.items())),
    }


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_shards(refer_root: str | Path, dataset: str, split_by: str, images_dir: str | Path, out: str | Path,
                 splits: list[str] | None = None, workers: int = 2, max_samples: int = 1000,
                 max_mb: float = 256.0, max_reject_share: float = 0.05) -> dict:
    """Convert a REFER dataset into a shard set under ``out``; returns the manifest.

    Shards are written into ``out/.partial`` and moved into place with the manifest only when every
    split is done, so an interrupted build never leaves a set that looks complete.
    Raises :class:`RejectShareExceeded` (after writing everything) when too many refs were rejected.
    """
    t0 = time.time()
    out = Path(out)
    records, rejected = read_refer(refer_root, dataset, split_by, images_dir, splits)
    partial = out / ".partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    refs_path, instances_path = refer_files(refer_root, dataset, split_by)
    by_split: dict[str, list[ReferRecord]] = {}
    for rec in records:
        by_split.setdefault(rec.split, []).append(rec)
    source, source_refs = _source_counts(refs_path, DATASET_SPLITS[(dataset, split_by)], splits)
    manifest_splits = {}
    pool = mp.get_context().Pool(workers) if workers > 1 else None  # the platform default: fork on Linux
    try:
        # Every split the refs file holds gets an entry, even one whose refs were all rejected.
        for split in sorted(set(by_split) | set(source)):
            roller = _ShardRoller(partial, split, max_samples, int(max_mb * 2**20))
            jobs = [_Job(r, dataset, split_by, str(refs_path)) for r in by_split.get(split, [])]
            results = pool.imap(_encode_record, jobs, chunksize=16) if pool else map(_encode_record, jobs)
            image_refs: dict[int, int] = {}
            for job, res in zip(jobs, tqdm(results, total=len(jobs), desc=f"{dataset}/{split_by} {split}", unit="ref")):
                if isinstance(res, Rejection):
                    rejected.append(res)
                else:
                    roller.write(res)
                    image_refs[job.record.image_id] = image_refs.get(job.record.image_id, 0) + 1
            roller.close()
            split_rejected = [source_refs[r.ref_id] for r in rejected if isinstance(r.ref_id, int)
                              and source_refs.get(r.ref_id, ("",))[0] == split]
            manifest_splits[split] = _split_entry(shards=roller.shards,
                                                  source=source.get(split, {"refs": 0, "expressions": 0}),
                                                  rejected=split_rejected, image_refs=image_refs,
                                                  groups=roller.groups)
    finally:
        if pool:
            pool.close()
            pool.join()
    considered = sum(v["samples"] for v in manifest_splits.values()) + len(rejected)
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r.kind] = reasons.get(r.kind, 0) + 1
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": {"dataset": dataset, "split_by": split_by, "refs_file": str(refs_path),
                   "instances_file": str(instances_path),
                   "images_dir": str(images_dir)},
        "splits": manifest_splits,
        "rejected": {"count": len(rejected), "share": len(rejected) / max(considered, 1), "reasons": reasons,
                     "file": REJECTED},
        "build_seconds": round(time.time() - t0, 2),
    }
    with open(partial / REJECTED, "w") as f:
        for r in rejected:
            f.write(json.dumps(r.to_dict()) + "\n")
    # Move into place: the set is replaced as a whole, and the manifest is written last.
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for old in out.glob("*.tar"):
        old.unlink()
    for f in partial.iterdir():
        f.replace(out / f.name)
    partial.rmdir()
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if manifest["rejected"]["share"] > max_reject_share:
        raise RejectShareExceeded(
            f"{len(rejected)} of {considered} refs rejected ({manifest['rejected']['share']:.1%} > "
            f"{max_reject_share:.1%}); see {out / REJECTED}")
    return manifest


class RejectShareExceeded(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Reading a set back
# ---------------------------------------------------------------------------------------------


def load_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {shard_dir}: not a (complete) shard set; build it with "
                                f"'ppcr-shards build' or 'make shards'")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}, a shard "
                         f"set written by another ppcr; rebuild it ('make clean-data shards' for the synthetic set, "
                         f"'ppcr-shards build' for a REFER set: README, Data)")
    return manifest


def split_groups(shard_dir: str | Path, split: str) -> list[str]:
    """The expression groups of one split (sorted), as its manifest entry counts them."""
    return list(load_manifest(shard_dir)["splits"][split]["groups"])


def split_shards(shard_dir: str | Path, split: str) -> list[dict]:
    """The manifest entries of one split's shards, each with its full ``path``."""
    manifest = load_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise ValueError(f"shard set {shard_dir} has no split '{split}' (splits: {', '.join(manifest['splits'])})")
    return [dict(s, path=str(Path(shard_dir) / s["name"])) for s in manifest["splits"][split]["shards"]]


def iter_tar_samples(path: str | Path) -> Iterator[dict]:
    """Samples of one tar in order, grouped by key; raises on a broken archive."""
    current: dict | None = None
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, _, suffix = member.name.partition(".")
            data = tar.extractfile(member).read()
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[suffix] = data
    if current is not None:
        yield current


def verify_shards(shard_dir: str | Path, deep: bool = True) -> tuple[list[str], dict]:
    """Check a set against its manifest; returns (problems, counts). ``deep`` decodes every sample."""
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    problems: list[str] = []
    counts = {"shards": 0, "samples": 0, "expressions": 0}
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            path = shard_dir / shard["name"]
            counts["shards"] += 1
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            if path.stat().st_size != shard["bytes"]:
                problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {shard['bytes']}")
            if sha256_file(path) != shard["sha256"]:
                problems.append(f"{path}: sha256 differs from the manifest")
            if not deep:
                continue
            n = n_expr = 0
            try:
                for raw in iter_tar_samples(path):
                    n += 1
                    try:
                        sample = decode_sample(raw)
                        n_expr += len(sample["meta"]["sentences"])
                    except SampleError as e:
                        problems.append(f"{path}: {e}")
            except (tarfile.TarError, OSError, EOFError) as e:
                problems.append(f"{path}: unreadable tar after {n} samples ({e})")
            if n != shard["samples"]:
                problems.append(f"{path}: {n} samples, manifest says {shard['samples']}")
            counts["samples"] += n
            counts["expressions"] += n_expr
    return problems, counts
