"""Training refs whose image an evaluation split shows: found from the manifests, left out of training.

RefCOCO, RefCOCO+ and RefCOCOg take their images from one pool, COCO train2014, and each made its own
split of it: an image of RefCOCOg/umd's train split can be one of RefCOCO/unc's val or test images,
with other objects and expressions. A model trained on the mixture has then seen evaluation images,
which the published numbers of MDETR, SeqTR and PolyFormer avoid by removing those images from
training. With ``data.exclude_eval_images`` (the default) the training stream drops every sample
whose image is in a split of ``eval.sets``. An image is (pool, image_id): the pool is COCO train2014
for the RefCOCO family and the dataset itself otherwise (the synthetic set draws its own images).

The images of a split come from its manifest (``image_ids`` and ``image_refs``, recorded at build; a
manifest of another format is refused, :func:`ppcr.data.shards.load_manifest`). The filter is a
predicate on raw samples before the stream groups them into batches, so the groups a loader worker
forms, and with them resume (which counts groups), stay a function of data and config. A training
set that is itself one of the eval splits is not filtered against itself, which would empty it:
training on an eval split is then what the recipe asks for, and the report says so.

An eval split whose shards are missing when training starts cannot be left out: training refuses to
start (:func:`check_eval_splits_present`) unless ``data.exclude_eval_images`` is off or the split is named
in ``data.eval_splits_missing_ok``. Each checkpoint records which eval splits its training left out
(:func:`exclusion_record`, ``ppcr_excluded.json``), and evaluation flags a split that was not.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ppcr.config import ShardSetConfig
from ppcr.data.shards import load_manifest

COCO_POOL = "coco_train2014"
RECORD_FILE = "ppcr_excluded.json"  # in every checkpoint and export: which eval splits training left out
COCO_DATASETS = frozenset({"refcoco", "refcoco+", "refcocog"})
PREFIX = "exclude_eval_images:"


def image_pool(dataset: str) -> str:
    """The pool a dataset's image ids number: images of one pool with one id are the same image."""
    return COCO_POOL if dataset in COCO_DATASETS else dataset


def raw_image_id(raw: dict) -> int | None:
    """The image_id of an undecoded shard sample; None where its json is missing or broken (the
    decoder then skips and counts the sample, as it does without the filter)."""
    try:
        return int(json.loads(raw["json"])["image_id"])
    except (KeyError, TypeError, ValueError, UnicodeDecodeError):
        return None


def split_images(shard_dir: Path, split: str) -> tuple[str, dict[int, int]] | None:
    """(pool, {image_id: refs in the shards}) of one split of a shard set; None where the set or the
    split does not exist."""
    try:
        manifest = load_manifest(shard_dir)
    except FileNotFoundError:
        return None
    entry = manifest["splits"].get(split)
    if entry is None:
        return None
    return image_pool(manifest["source"]["dataset"]), dict(zip(entry["image_ids"], entry["image_refs"]))


def fingerprint(image_ids: frozenset[int]) -> str:
    """A short exact identity of an image set, for the loader's resume check."""
    digest = hashlib.sha256(",".join(map(str, sorted(image_ids))).encode()).hexdigest()
    return f"{len(image_ids)} images, sha256 {digest[:16]}"


@dataclass(frozen=True)
class Exclusion:
    """What one training set leaves out."""

    train: str  # "name/split"
    image_ids: frozenset[int] = frozenset()
    refs: int = 0  # training refs dropped, each once however many eval splits show its image
    by_eval: tuple[tuple[str, int], ...] = ()  # (eval "name/split", training refs whose image it shows)
    is_eval: bool = False  # the training set is also an eval split: not filtered against itself


@dataclass(frozen=True)
class ExclusionPlan:
    """One :class:`Exclusion` per training set, in order, and the eval splits that could not be read."""

    sets: list[Exclusion]
    missing: list[str] = field(default_factory=list)  # eval "name/split" without a manifest or split
    shards_root: str = ""

    def report(self) -> list[str]:
        """The lines rank 0 prints when the training loader is built."""
        lines = []
        for x in self.sets:
            if x.refs:
                where = ", ".join(f"{name} ({n} refs)" for name, n in x.by_eval)
                lines.append(f"{PREFIX} dropped {x.refs} training refs of {x.train} ({len(x.image_ids)} images) "
                             f"whose image is in {where}")
            else:
                lines.append(f"{PREFIX} no training image of {x.train} is in an eval split")
            if x.is_eval:
                lines.append(f"{PREFIX} {x.train} is also in eval.sets; it is not filtered against itself")
        if self.missing:
            lines.append(f"{PREFIX} eval split(s) {', '.join(self.missing)} not found under {self.shards_root}: "
                         f"their images could not be left out of training")
        return lines


def _name(spec: ShardSetConfig) -> str:
    return f"{spec.name}/{spec.split}"


def plan_exclusions(shards_root: str | Path, train_sets: list[ShardSetConfig],
                    eval_sets: list[ShardSetConfig]) -> ExclusionPlan:
    """Which images and refs each training set drops so that no training image is an eval image."""
    root = Path(shards_root)
    evals: list[tuple[str, str, dict[int, int]]] = []
    missing = []
    for spec in eval_sets:
        found = split_images(root / spec.name, spec.split)
        if found is None:
            missing.append(_name(spec))
        elif _name(spec) not in [e[0] for e in evals]:
            evals.append((_name(spec), *found))
    plans = []
    for spec in train_sets:
        name = _name(spec)
        found = split_images(root / spec.name, spec.split)
        if found is None:  # the stream names the missing set when it opens it
            plans.append(Exclusion(train=name))
            continue
        pool, train_refs = found
        dropped: set[int] = set()
        by_eval = []
        for eval_name, eval_pool, eval_refs in evals:
            if eval_name == name or eval_pool != pool:
                continue
            shared = train_refs.keys() & eval_refs.keys()
            if shared:
                dropped |= shared
                by_eval.append((eval_name, sum(train_refs[i] for i in shared)))
        plans.append(Exclusion(train=name, image_ids=frozenset(dropped), refs=sum(train_refs[i] for i in dropped),
                               by_eval=tuple(by_eval), is_eval=any(e[0] == name for e in evals)))
    return ExclusionPlan(sets=plans, missing=missing, shards_root=str(root))


def check_eval_splits_present(shards_root: str | Path, train_sets: list[ShardSetConfig],
                              eval_sets: list[ShardSetConfig], missing_ok: list[str]) -> list[str]:
    """Under ``data.exclude_eval_images``: the eval splits without shards, unless each is named in
    ``missing_ok`` (``data.eval_splits_missing_ok``); ValueError naming them otherwise. Returns those let
    through, for the run's record."""
    plan = plan_exclusions(shards_root, train_sets, eval_sets)
    refused = [name for name in plan.missing if name not in missing_ok]
    if refused:
        raise ValueError(f"eval split(s) {', '.join(refused)} have no shards under {shards_root}, so their images "
                         "cannot be left out of training (data.exclude_eval_images) and their scores would count "
                         "images the model trained on. Build their shards first, or name them in "
                         "data.eval_splits_missing_ok to train anyway (make eval then flags them)")
    return plan.missing


def exclusion_record(shards_root: str | Path, train_sets: list[ShardSetConfig], eval_sets: list[ShardSetConfig],
                     enabled: bool) -> dict:
    """What a run's training left out: the eval splits ("name/split") whose images it dropped (every eval split
    found, except one that is itself a training set), for ``ppcr_excluded.json``."""
    if not enabled:
        return {"exclude_eval_images": False, "excluded_eval_splits": []}
    plan = plan_exclusions(shards_root, train_sets, eval_sets)
    trained = {_name(s) for s in train_sets}
    names = [_name(s) for s in eval_sets]
    excluded = [n for n in dict.fromkeys(names) if n not in plan.missing and n not in trained]
    return {"exclude_eval_images": True, "excluded_eval_splits": excluded}


def read_exclusion_record(directory: str | Path) -> dict | None:
    """The record a checkpoint or export keeps (:func:`exclusion_record`); None for one written before it."""
    path = Path(directory) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record.get("excluded_eval_splits"), list):
            raise ValueError("field 'excluded_eval_splits' must be a list")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable record of the eval splits training left out ({e})") from e
    return record
