"""How many expressions a split should be scored on, checked against the source and the published count.

A number that is comparable with a published table needs the full split. Refs that the shard builder
rejects (up to ``data.max_reject_share``) are missing from the shards, and a wrong or cut-down REFER
file gives a split of another size; either way the result would silently be on another set. The
shard manifest records, per split, what the refs file held (``source``), what was rejected and what
was written (see ``ppcr.data.shards``); :func:`expected_expressions` reads those counts back and
checks the source against the count the dataset's papers publish.

``OFFICIAL_EXPRESSIONS`` holds the expression (sentence) counts of the splits papers report on, as the
REFER release (lichengunc/refer) has them: RefCOCO and RefCOCO+ with the UNC split (Yu et al., ECCV
2016), RefCOCOg with the UMD split (Nagaraja et al., ECCV 2016) and the Google split (Mao et al., CVPR
2016). Where they were checked: RefCOCO/unc split by split against FlagEval's RefCOCO dataset page
(train 120624, val 10834, testA 5657, testB 5095); RefCOCO+/unc against its published total of
141,564 expressions, which its four splits sum to; RefCOCOg's train count 85,474 (Google split) as
dataset pages quote it, and its two split schemes re-divide the same refs: umd 80512 + 4896 + 9602
and google 85474 + 9536 both sum to 95,010. A refs file that disagrees is not the published one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ppcr.data.shards import load_manifest

# (dataset, split_by, split) -> expressions in that split of the REFER refs file.
OFFICIAL_EXPRESSIONS: dict[tuple[str, str, str], int] = {
    ("refcoco", "unc", "train"): 120624,
    ("refcoco", "unc", "val"): 10834,
    ("refcoco", "unc", "testA"): 5657,
    ("refcoco", "unc", "testB"): 5095,
    ("refcoco+", "unc", "train"): 120191,
    ("refcoco+", "unc", "val"): 10758,
    ("refcoco+", "unc", "testA"): 5726,
    ("refcoco+", "unc", "testB"): 4889,
    ("refcocog", "umd", "train"): 80512,
    ("refcocog", "umd", "val"): 4896,
    ("refcocog", "umd", "test"): 9602,
    ("refcocog", "google", "train"): 85474,
    ("refcocog", "google", "val"): 9536,
}

@dataclass(frozen=True)
class SplitCount:
    """Expressions of one split of a shard set.

    ``source`` = ``written`` + ``rejected`` + ``blank``: what the refs file holds, what the shards
    hold, what the rejected refs held, and the empty expressions dropped from refs that were kept.
    """

    source: int  # in the split of the REFER refs file, before any rejection
    written: int  # in the shards: what an evaluation scores
    rejected: int  # of the refs rejected at build
    official: int | None  # the published count, where the dataset/split_by has one
    blank: int = 0  # empty expressions dropped from refs that were kept


def expected_expressions(shard_dir: Path, split: str) -> SplitCount:
    """The expression counts of ``split`` of the shard set ``shard_dir``, from its manifest.

    Raises ValueError when the split is missing, when the manifest is of another format (the set must be
    rebuilt, :func:`ppcr.data.shards.load_manifest`), and when the refs file's count differs from the
    published one: a wrong or partial REFER file, whose numbers would not be comparable with published tables.
    """
    manifest = load_manifest(shard_dir)
    splits = manifest["splits"]
    if split not in splits:
        raise ValueError(f"shard set {shard_dir} has no split '{split}' (splits: {', '.join(splits)})")
    entry = splits[split]
    src = manifest["source"]
    official = OFFICIAL_EXPRESSIONS.get((src["dataset"], src["split_by"], split))
    source = int(entry["source"]["expressions"])
    if official is not None and source != official:
        raise ValueError(f"shard set {shard_dir} split '{split}': the refs file {src.get('refs_file', '?')} holds "
                         f"{source} expressions, the published {src['dataset']}/{src['split_by']} {split} has "
                         f"{official}; a wrong or partial REFER file gives numbers that are not comparable")
    return SplitCount(source=source, written=int(entry["expressions"]),
                      rejected=int(entry["rejected"]["expressions"]), official=official,
                      blank=int(entry["blank_expressions"]))
