"""Streaming shard sets to training and evaluation.

Each (rank, loader worker) pair is a *slot*. For every shard set and epoch the shard list is
permuted by (seed, set, epoch), identically on all ranks, and slot ``s`` of ``n`` reads shards
``s, s + n, ...``: slots see disjoint samples and together every sample once per epoch.
Within a slot a shuffle buffer (seeded by seed, set, epoch, slot) mixes samples; several sets are
mixed by their ratios with a per-slot seeded choice. Training streams are endless (each set runs
through its epochs independently); the run length is the trainer's step count.

Raw samples (undecoded bytes) are grouped into batches *before* decoding, so a worker's batch ``g``
is always made of the same refs. The expression of a ref and its horizontal flip are drawn from
(seed, epoch, key), so they do not depend on the order of decoding either.

Resume is exact at batch granularity: :class:`ResumableLoader` records, per loader worker, how many
raw groups the batches consumed so far used up; a restarted loader skips those groups undecoded and
starts its round-robin at the worker whose batch comes next. It needs the same world size,
number of workers, batch size and data config; a mismatch is refused with a message.

A sample that does not decode, or a shard that breaks off, is skipped, counted and logged with its
shard and key; a batch with dropped samples is smaller. Should all samples of a group fail, the worker
takes the next group in its place, and a resume reproduces that too.

With ``data.exclude_eval_images`` a training set drops, before grouping, every sample whose image
is in a split of ``eval.sets`` (``ppcr.data.overlap``): the groups stay a function of data and config,
and the dropped images are part of the identity a resume checks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ppcr.config import Config, ShardSetConfig
from ppcr.data.overlap import fingerprint, plan_exclusions, raw_image_id
from ppcr.data.shards import SampleError, decode_sample, split_shards
from ppcr.data.transforms import Preprocessor, hflip
from ppcr.data.worker_signals import WORKER_CONTEXT, ignore_stop_signals

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSet:
    """One shard set's split as the reader sees it."""

    name: str
    shards: list[dict]  # manifest entries with "path"
    ratio: float = 1.0
    exclude_images: frozenset[int] = frozenset()  # image ids whose samples are dropped (data.exclude_eval_images)

    @classmethod
    def open(cls, shards_root: str | Path, spec: ShardSetConfig) -> "ShardSet":
        return cls(f"{spec.name}/{spec.split}", split_shards(Path(shards_root) / spec.name, spec.split), spec.ratio)


class _Errors:
    """Counts what a worker had to skip since its last batch."""

    def __init__(self) -> None:
        self.count = 0

    def tar_handler(self, exn: Exception) -> bool:
        self.count += 1
        log.warning("skipping broken shard data: %s", exn)
        return True  # continue with the next shard

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


def slot_shards(shards: list[dict], seed: int, set_index: int, epoch: int, slot: int, num_slots: int,
                shuffle: bool) -> list[dict]:
    """The shards a slot reads in one epoch: a permutation shared by all slots, then every n-th."""
    order = list(shards)
    if shuffle:
        perm = np.random.default_rng([seed, set_index, epoch]).permutation(len(order))
        order = [order[i] for i in perm]
    return order[slot::num_slots]


def set_stream(shard_set: ShardSet, set_index: int, seed: int, slot: int, num_slots: int, shuffle_buffer: int,
               errors: _Errors, shuffle: bool = True, epochs: int | None = None) -> Iterator[dict]:
    """Raw samples of one set for one slot, epoch after epoch; each carries ``__epoch__``."""
    epoch = 0
    while epochs is None or epoch < epochs:
        mine = slot_shards(shard_set.shards, seed, set_index, epoch, slot, num_slots, shuffle)
        src: Iterator[dict] = iter(()) if not mine else wds.DataPipeline(
            wds.SimpleShardList([s["path"] for s in mine]),
            wds.tarfile_to_samples(handler=errors.tar_handler),
        ).iterator()
        if shard_set.exclude_images:  # before the shuffle buffer, which then holds only samples that are used
            src = (r for r in src if raw_image_id(r) not in shard_set.exclude_images)
        if shuffle:
            rng = random.Random(f"{seed}-{set_index}-{epoch}-{slot}")
            src = wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=rng)(src)
        seen = 0
        for raw in src:
            raw["__epoch__"] = epoch
            seen += 1
            yield raw
        if seen == 0 and epochs is None:
            excluded = (f", or data.exclude_eval_images dropped all {len(shard_set.exclude_images)} of their "
                        f"images" if shard_set.exclude_images else "")
            raise RuntimeError(f"shard set {shard_set.name}: slot {slot} read no sample in epoch {epoch} "
                               f"(all its shards are empty or broken{excluded})")
        epoch += 1


def mix(streams: list[Iterator[dict]], ratios: list[float], rng: random.Random) -> Iterator[dict]:
    """Endless mixture: each sample comes from stream i with probability ratio_i / sum(ratios)."""
    if len(streams) == 1:
        yield from streams[0]
        return
    index = list(range(len(streams)))
    while True:
        yield next(streams[rng.choices(index, weights=ratios)[0]])


def choose_expression(sentences: list[str], seed: int, epoch: int, key: str, flip_prob: float) -> tuple[str, bool]:
    """One expression per ref per visit, and whether to flip; a function of (seed, epoch, key)."""
    rng = random.Random(f"{seed}-{epoch}-{key}")
    return rng.choice(sentences), rng.random() < flip_prob


def prepare(sample: dict, sentence: str, flip: bool, pre: Preprocessor) -> dict:
    """Decoded sample + chosen expression -> one item of a batch."""
    image, mask, bbox, meta = sample["image"], sample["mask"], sample["meta"]["bbox"], sample["meta"]
    if flip:
        image, mask, bbox, sentence = hflip(image, mask, bbox, sentence)
    item = pre(image, mask, bbox)
    item.update({
        "expression": sentence,
        "category": meta["category"],
        "category_id": meta["category_id"],
        "key": sample["key"],
        "ref_id": meta["ref_id"],
        "dataset": meta["dataset"],
        "flipped": flip,
    })
    return item


def collate(items: list[dict]) -> dict:
    """Stack fixed-size tensors; keep original-resolution masks as a list (their sizes differ)."""
    return {
        "sam_images": torch.stack([it["sam_image"] for it in items]),  # (B, 3, S, S) uint8
        "mllm_images": torch.stack([it["mllm_image"] for it in items]),  # (B, 3, M, M) uint8
        "sam_masks": torch.stack([it["sam_mask"] for it in items]),  # (B, S, S) uint8
        "boxes": torch.stack([it["box"] for it in items]),  # (B, 4) normalised cx, cy, w, h
        "masks": [it["mask"] for it in items],  # B x (H_i, W_i) uint8, original resolution
        "original_sizes": torch.tensor([it["original_size"] for it in items]),  # (B, 2) h, w
        "input_sizes": torch.tensor([it["input_size"] for it in items]),  # (B, 2) h, w before padding
        "category_ids": torch.tensor([it["category_id"] for it in items]),
        "expressions": [it["expression"] for it in items],
        "categories": [it["category"] for it in items],
        "keys": [it["key"] for it in items],
        "ref_ids": [it["ref_id"] for it in items],
        "datasets": [it["dataset"] for it in items],
        "flipped": torch.tensor([it["flipped"] for it in items]),
    }


class TrainStream(IterableDataset):
    """Endless, mixed, shuffled batches for one rank; see the module docstring for the guarantees."""

    def __init__(self, sets: list[ShardSet], pre: Preprocessor, batch_size: int, seed: int, rank: int,
                 world_size: int, shuffle_buffer: int, flip_prob: float) -> None:
        super().__init__()
        self.sets, self.pre, self.batch_size, self.seed = sets, pre, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.flip_prob = shuffle_buffer, flip_prob
        # Set by ResumableLoader before each iteration:
        self.skip_groups: list[int] = []  # per logical worker: raw groups already consumed
        self.worker_offset = 0  # logical worker of the loader's first batch

    def check_slots(self, num_workers: int) -> None:
        slots = self.world_size * max(num_workers, 1)
        for s in self.sets:
            if len(s.shards) < slots:
                raise ValueError(f"shard set {s.name} has {len(s.shards)} shards, fewer than ranks x workers = "
                                 f"{slots}: every slot needs shards; rebuild with a smaller "
                                 f"data.shard_max_samples or use fewer data.num_workers")

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        num_workers = info.num_workers if info else 1
        worker = ((info.id if info else 0) + self.worker_offset) % num_workers
        slot, num_slots = self.rank * num_workers + worker, self.world_size * num_workers
        errors = _Errors()
        streams = [iter(set_stream(s, i, self.seed, slot, num_slots, self.shuffle_buffer, errors))
                   for i, s in enumerate(self.sets)]
        raw = mix(streams, [s.ratio for s in self.sets], random.Random(f"{self.seed}-mix-{slot}"))
        groups = 0
        skip = self.skip_groups[worker] if self.skip_groups else 0
        while True:
            group = [next(raw) for _ in range(self.batch_size)]
            groups += 1
            if groups <= skip:  # consumed before the restart: not decoded, errors counted then
                if groups == skip:
                    errors.take()
                continue
            items = []
            for r in group:
                try:
                    sample = decode_sample(r)
                    sentence, flip = choose_expression(sample["meta"]["sentences"], self.seed, r["__epoch__"],
                                                       sample["key"], self.flip_prob)
                    items.append(prepare(sample, sentence, flip, self.pre))
                except SampleError as e:
                    errors.count += 1
                    log.warning("skipping sample in %s: %s", r.get("__url__", "?"), e)
            if not items:
                continue  # every sample of the group was broken: the next group takes its place
            batch = collate(items)
            batch["worker"] = worker
            batch["worker_groups"] = groups
            batch["skipped_samples"] = errors.take()
            yield batch


def sample_ranges(shards: list[dict], slot: int, num_slots: int) -> list[tuple[dict, int, int]]:
    """A slot's contiguous, balanced share of a split's samples, counted by the manifest: (shard, first,
    end) local indices per shard it touches. Contiguous keeps a ref's expressions, and mostly an image's
    refs, together (a batch shares their image work); by samples, not by shards, so that ranks get the
    same share however few shards a split has."""
    total = sum(s["samples"] for s in shards)
    start, end = slot * total // num_slots, (slot + 1) * total // num_slots
    out, offset = [], 0
    for s in shards:
        lo, hi = max(start - offset, 0), min(end - offset, s["samples"])
        if lo < hi:
            out.append((s, lo, hi))
        offset += s["samples"]
    return out


class EvalStream(IterableDataset):
    """One pass over a split, every expression once, split over ranks and workers without padding
    (:func:`sample_ranges`)."""

    def __init__(self, shard_set: ShardSet, pre: Preprocessor, batch_size: int, rank: int, world_size: int) -> None:
        super().__init__()
        self.set, self.pre, self.batch_size = shard_set, pre, batch_size
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        num_workers, worker = (info.num_workers, info.id) if info else (1, 0)
        slot, num_slots = self.rank * num_workers + worker, self.world_size * num_workers
        errors = _Errors()
        items: list[dict] = []
        for r in self._raw(slot, num_slots, errors):
            try:
                sample = decode_sample(r)
            except SampleError as e:
                errors.count += 1
                log.warning("skipping sample in %s: %s", r.get("__url__", "?"), e)
                continue
            for sentence in sample["meta"]["sentences"]:
                items.append(prepare(sample, sentence, False, self.pre))
                if len(items) == self.batch_size:
                    yield dict(collate(items), skipped_samples=errors.take())
                    items = []
        if items:
            yield dict(collate(items), skipped_samples=errors.take())

    def _raw(self, slot: int, num_slots: int, errors: _Errors) -> Iterator[dict]:
        for shard, lo, hi in sample_ranges(self.set.shards, slot, num_slots):
            src = wds.DataPipeline(wds.SimpleShardList([shard["path"]]),
                                   wds.tarfile_to_samples(handler=errors.tar_handler)).iterator()
            for i, raw in enumerate(src):
                if i >= hi:
                    break
                if i >= lo:
                    yield raw


class ResumableLoader:
    """A DataLoader over a :class:`TrainStream` that can say where it is and continue from there."""

    def __init__(self, stream: TrainStream, num_workers: int, prefetch_factor: int = 2) -> None:
        stream.check_slots(num_workers)
        self.stream, self.num_workers, self.prefetch_factor = stream, num_workers, prefetch_factor
        self.batches = 0  # batches handed out so far
        self.worker_groups = [0] * max(num_workers, 1)
        self.skipped_samples = 0

    def _identity(self) -> dict:
        s = self.stream
        identity = {"world_size": s.world_size, "rank": s.rank, "num_workers": self.num_workers,
                    "batch_size": s.batch_size, "seed": s.seed,
                    "sets": [(x.name, x.ratio, len(x.shards)) for x in s.sets]}
        excluded = {x.name: fingerprint(x.exclude_images) for x in s.sets if x.exclude_images}
        if excluded:  # only then: a state saved without exclusions matches a stream that drops nothing
            identity["excluded_images"] = excluded
        return identity

    def state_dict(self) -> dict:
        return {"batches": self.batches, "worker_groups": list(self.worker_groups),
                "skipped_samples": self.skipped_samples, "identity": self._identity()}

    def load_state_dict(self, state: dict) -> None:
        mine, theirs = json.loads(json.dumps(self._identity())), state["identity"]
        for k in list(mine) + [k for k in theirs if k not in mine]:  # a key only one side has differs too
            if json.loads(json.dumps(theirs.get(k))) != mine.get(k):
                raise ValueError(f"cannot resume the data stream: '{k}' was {theirs.get(k)!r} when saved and is "
                                 f"{mine.get(k)!r} now; the same order needs the same setting")
        self.batches = int(state["batches"])
        self.worker_groups = list(state["worker_groups"])
        self.skipped_samples = int(state["skipped_samples"])

    def __iter__(self) -> Iterator[dict]:
        nw = max(self.num_workers, 1)
        self.stream.skip_groups = list(self.worker_groups)
        self.stream.worker_offset = self.batches % nw
        # Its own generator: worker seeding must not draw from the global RNG, which a resumed
        # run restores for dropout. Workers ignore preemption signals: the rank decides.
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            persistent_workers=False, generator=torch.Generator().manual_seed(self.stream.seed),
                            worker_init_fn=ignore_stop_signals,
                            multiprocessing_context=WORKER_CONTEXT if self.num_workers else None)
        for batch in loader:
            self.batches += 1
            self.worker_groups[batch.pop("worker")] = batch.pop("worker_groups")
            self.skipped_samples += batch["skipped_samples"]
            yield batch


def build_train_loader(cfg: Config, rank: int, world_size: int) -> ResumableLoader:
    """The training loader of one rank; with data.exclude_eval_images rank 0 prints what it drops."""
    sets = [ShardSet.open(cfg.paths.shards_root, s) for s in cfg.data.train_sets]
    if cfg.data.exclude_eval_images:
        plan = plan_exclusions(cfg.paths.shards_root, cfg.data.train_sets, cfg.eval.sets)
        sets = [dataclasses.replace(s, exclude_images=x.image_ids) for s, x in zip(sets, plan.sets)]
        if rank == 0:
            print("\n".join(plan.report()), flush=True)
    stream = TrainStream(sets, Preprocessor.from_config(cfg.model), cfg.train.micro_batch_size, cfg.train.seed,
                         rank, world_size, cfg.data.shuffle_buffer, cfg.data.flip_prob)
    return ResumableLoader(stream, cfg.data.num_workers)


def build_eval_loader(cfg: Config, spec: ShardSetConfig, rank: int, world_size: int) -> DataLoader:
    stream = EvalStream(ShardSet.open(cfg.paths.shards_root, spec), Preprocessor.from_config(cfg.model),
                        cfg.eval.batch_size, rank, world_size)
    return DataLoader(stream, batch_size=None, num_workers=cfg.data.num_workers, worker_init_fn=ignore_stop_signals,
                      multiprocessing_context=WORKER_CONTEXT if cfg.data.num_workers else None)
