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

Resume is exact at batch granularity and seeks: every batch carries its worker's position after it
(per set: epoch, where reading continues, the shuffle buffer's sample positions and RNG; the mixer's
RNG), :class:`ResumableLoader` keeps the latest per worker, and a restarted worker rebuilds its
buffers by reading the shards that hold them, then continues. Its cost is bounded by one epoch of a
slot's shards, not by the run's length. It needs the same world size, number of workers, batch size,
shuffle buffer, data config and shard contents; a mismatch is refused with a message.

Elastic resume (another number of ranks or workers, :meth:`ResumableLoader.load_elastic`) cannot seek, since
the slots are others: each set's epochs the old slots had begun are dealt again over the new slots, less
every sample an old slot had used (:func:`elastic_plans`). No sample of an epoch is used twice and none is
left out; what sat in shuffle buffers or prefetched batches is read again.

A sample that does not decode, or a shard that breaks off, is skipped, counted and logged with its
shard and key; a batch with dropped samples is smaller. Should all samples of a group fail, the worker
takes the next group in its place, and a resume reproduces that too.

With ``data.exclude_eval_images`` a training set drops, before grouping, every sample whose image
is in a split of ``eval.sets`` (``ppcr.data.overlap``): the groups stay a function of data and config,
and the dropped images are part of the identity a resume checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
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

from ppcr.common.random_state import dump_random, load_random
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


def shard_samples(path: str, errors: _Errors) -> Iterator[dict]:
    """Raw samples of one shard, in order, through webdataset's tar reader (a shard that breaks off
    ends early, counted in ``errors``)."""
    return wds.DataPipeline(wds.SimpleShardList([path]),
                            wds.tarfile_to_samples(handler=errors.tar_handler)).iterator()


Position = tuple[int, int]  # (shard index in the slot's list for the epoch, sample index in that shard)
Plans = dict[int, list[tuple[dict, frozenset[int]]]]  # epoch -> the slot's shards and the samples to skip in each


def plans_to_json(plans: Plans) -> dict[str, list]:
    return {str(e): [[entry["name"], sorted(skip)] for entry, skip in plan] for e, plan in sorted(plans.items())}


def plans_from_json(data: dict | None, shard_set: ShardSet) -> Plans:
    by_name = {s["name"]: s for s in shard_set.shards}
    try:
        return {int(e): [(by_name[name], frozenset(int(i) for i in skip)) for name, skip in plan]
                for e, plan in (data or {}).items()}
    except KeyError as e:
        raise ValueError(f"cannot resume the data stream of {shard_set.name}: its state names shard {e}, which the "
                         "shard set no longer has; the shards changed") from e


class SetReader:
    """One set's raw samples for one slot, epoch after epoch, shuffled by a buffer; each sample carries
    ``__epoch__``.

    Its whole position is a small JSON-able :meth:`state`: the epoch, where reading continues, the
    positions of the buffered samples and the shuffle RNG. :meth:`restore` seeks there: it reads the
    shards that hold buffered samples and the rest of the current shard, so a resume costs at most
    one epoch of this slot's shards, however long the run was.

    The buffer is webdataset's shuffle stage (``webdataset.filters._shuffle`` with ``initial`` equal
    to the buffer size), step for step and with the same RNG draws, so the order is the one
    ``wds.shuffle`` gives. It is written out here because webdataset keeps that buffer in a generator's
    frame, which a checkpoint cannot read or rebuild.
    """

    def __init__(self, shard_set: ShardSet, *, set_index: int, seed: int, slot: int, num_slots: int,
                 shuffle_buffer: int, errors: _Errors, shuffle: bool = True, epochs: int | None = None,
                 plans: Plans | None = None) -> None:
        self.set, self.set_index, self.seed = shard_set, set_index, seed
        self.slot, self.num_slots, self.bufsize = slot, num_slots, shuffle_buffer
        self.errors, self.shuffle, self.epochs = errors, shuffle, epochs
        self.plans: Plans = dict(plans or {})  # epochs whose shards an elastic resume dealt (:func:`elastic_plans`)
        self._start_epoch(min(self.plans) if self.plans else 0)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.seen = epoch, 0
        if epoch in self.plans:  # the rest of an epoch other slots began: these shards, less what they used
            self.shards = [entry for entry, _ in self.plans[epoch]]
            self.skips = [skip for _, skip in self.plans[epoch]]
        else:
            self.shards = slot_shards(self.set.shards, self.seed, self.set_index, epoch, self.slot, self.num_slots,
                                      self.shuffle)
            self.skips = [frozenset()] * len(self.shards)
        self.rng = random.Random(f"{self.seed}-{self.set_index}-{epoch}-{self.slot}")
        self.buffer: list[tuple[Position, dict]] = []
        self.next_read: Position = (0, 0)
        self.drained = False  # the epoch's shards are read to the end; the buffer empties
        self.source = self._read(0, 0)

    def _read(self, shard: int, first: int) -> Iterator[tuple[Position, dict]]:
        """Samples from ``(shard, first)`` on, skipping excluded images; keeps ``next_read`` current."""
        for j in range(shard, len(self.shards)):
            for i, raw in enumerate(shard_samples(self.shards[j]["path"], self.errors)):
                if j == shard and i < first or i in self.skips[j]:
                    continue
                self.next_read = (j, i + 1)
                if self.set.exclude_images and raw_image_id(raw) in self.set.exclude_images:
                    continue  # before the buffer, which then holds only samples that are used
                yield (j, i), raw

    def __iter__(self) -> "SetReader":
        return self

    def __next__(self) -> dict:
        while True:
            item = self._next_in_epoch()
            if item is not None:
                self.seen += 1
                raw = item[1]
                raw["__epoch__"] = self.epoch
                return raw
            if self.seen == 0 and self.epochs is None and self.epoch not in self.plans:
                excluded = (f", or data.exclude_eval_images dropped all {len(self.set.exclude_images)} of their "
                            f"images" if self.set.exclude_images else "")
                raise RuntimeError(f"shard set {self.set.name}: slot {self.slot} read no sample in epoch "
                                   f"{self.epoch} (all its shards are empty or broken{excluded})")
            if self.epochs is not None and self.epoch + 1 >= self.epochs:
                raise StopIteration
            self._start_epoch(self.epoch + 1)

    def _next_in_epoch(self) -> tuple[Position, dict] | None:
        if not self.shuffle:
            return next(self.source, None)
        while not self.drained:  # webdataset's _shuffle, one output per call
            sample = next(self.source, None)
            if sample is None:
                self.drained = True
                break
            self.buffer.append(sample)
            if len(self.buffer) < self.bufsize:
                more = next(self.source, None)
                if more is None:
                    self.drained = True
                else:
                    self.buffer.append(more)
            if len(self.buffer) >= self.bufsize:
                return self._pick()
        return self._pick() if self.buffer else None

    def _pick(self) -> tuple[Position, dict]:
        k = self.rng.randint(0, len(self.buffer) - 1)
        item = self.buffer[k]
        self.buffer[k] = self.buffer[-1]
        self.buffer.pop()
        return item

    def state(self) -> dict:
        out = {"epoch": self.epoch, "seen": self.seen, "next_read": list(self.next_read),
               "drained": self.drained, "buffer": [list(p) for p, _ in self.buffer],
               "rng": dump_random(self.rng)}
        if self.plans:  # every dealt epoch, begun or done: the next elastic resume needs what each slot got
            out["plans"] = plans_to_json(self.plans)
        return out

    def restore(self, state: dict) -> None:
        """Continue from :meth:`state`; reads only the shards that hold buffered samples and the current
        one up to where reading continues."""
        self.plans = plans_from_json(state.get("plans"), self.set)
        self._start_epoch(int(state["epoch"]))
        self.seen, self.drained = int(state["seen"]), bool(state["drained"])
        load_random(state["rng"], self.rng)
        positions = [(int(j), int(i)) for j, i in state["buffer"]]
        fetched = self._fetch(set(positions))
        self.buffer = [(p, fetched[p]) for p in positions]
        shard, first = (int(x) for x in state["next_read"])
        self.next_read = (shard, first)
        self.source = iter(()) if self.drained else self._read(shard, first)

    def _fetch(self, positions: set[Position]) -> dict[Position, dict]:
        out: dict[Position, dict] = {}
        for j in sorted({j for j, _ in positions}):
            wanted = {i for jj, i in positions if jj == j}
            last = max(wanted)
            for i, raw in enumerate(shard_samples(self.shards[j]["path"], self.errors)):
                if i in wanted:
                    out[(j, i)] = raw
                if i >= last:
                    break
        missing = positions - out.keys()
        if missing:
            j, i = min(missing)
            raise RuntimeError(f"cannot resume the data stream: shard {self.shards[j]['path']} no longer holds "
                               f"sample {i}, which the checkpoint's shuffle buffer held; the shards changed")
        return out


def shards_digest(shards: list[dict]) -> str:
    """A short identity of a split's shards by content: the manifest's names and SHA-256s."""
    text = "\n".join(f"{s['name']} {s['sha256']}" for s in shards)
    return f"{len(shards)} shards, sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _epoch_shards(shard_set: ShardSet, *, set_index: int, seed: int, epoch: int, slot: int, num_slots: int,
                  plans: Plans) -> list[tuple[dict, frozenset[int]]]:
    """What a slot reads in ``epoch``: its dealt plan, else its share of the epoch's permutation."""
    if epoch in plans:
        return plans[epoch]
    return [(e, frozenset()) for e in slot_shards(shard_set.shards, seed, set_index, epoch, slot, num_slots, True)]


def used_samples(shard_set: ShardSet, *, set_index: int, seed: int,
                 old: list[dict | None]) -> dict[int, dict[str, frozenset[int] | None]]:
    """Per epoch from the oldest any old slot is in to the newest any began or was dealt: shard name -> the sample
    indices the old slots (``old``: each one's :meth:`SetReader.state`, None for one that never handed out a
    batch) used, None for a whole shard. Used = read and not still in the shuffle buffer; or, in an epoch dealt
    by an earlier elastic resume, skipped as used before, or not dealt at all (used up before)."""
    states = [st or {"epoch": 0, "next_read": [0, 0], "buffer": []} for st in old]
    plans = [plans_from_json(st.get("plans"), shard_set) for st in states]
    first = min(int(st["epoch"]) for st in states)
    last = max([int(st["epoch"]) for st in states] + [e for p in plans for e in p])
    out: dict[int, dict[str, frozenset[int] | None]] = {e: {} for e in range(first, last + 1)}

    def add(epoch: int, entry: dict, used: set[int] | frozenset[int] | None) -> None:
        name = entry["name"]
        if used is None or len(used) >= entry["samples"] or out[epoch].get(name, ()) is None:
            out[epoch][name] = None
        else:
            out[epoch][name] = frozenset(used) | (out[epoch].get(name) or frozenset())

    for epoch in sorted({e for p in plans for e in p if first <= e <= last}):  # dealt epochs: what no slot got is used
        dealt = {entry["name"] for p in plans for entry, _ in p.get(epoch, [])}
        for entry in shard_set.shards:
            if entry["name"] not in dealt:
                add(epoch, entry, None)
    for slot, (st, mine) in enumerate(zip(states, plans)):
        at = int(st["epoch"])
        for epoch in range(first, last + 1):
            listed = _epoch_shards(shard_set, set_index=set_index, seed=seed, epoch=epoch, slot=slot,
                                   num_slots=len(states), plans=mine)
            if epoch < at:  # finished: its whole share
                for entry, _ in listed:
                    add(epoch, entry, None)
            elif epoch == at:  # read up to next_read, less what the shuffle buffer holds
                shard, first_unread = (int(x) for x in st["next_read"])
                buffered = [(int(j), int(i)) for j, i in st["buffer"]]
                for j, (entry, skip) in enumerate(listed):
                    read = range(entry["samples"] if j < shard else first_unread if j == shard else 0)
                    used = (set(read) | skip) - {i for jj, i in buffered if jj == j}
                    if used:
                        add(epoch, entry, used)
            else:  # not begun: only what a dealt plan skips
                for entry, skip in mine.get(epoch, []):
                    if skip:
                        add(epoch, entry, skip)
    return out


def elastic_plans(shard_set: ShardSet, *, set_index: int, seed: int, old: list[dict | None], new_slot: int,
                  new_num_slots: int) -> Plans:
    """What new slot ``new_slot`` of ``new_num_slots`` reads of the epochs the old slots had begun (``old``, see
    :func:`used_samples`): per epoch, the shards with samples no old slot used, in the epoch's permutation,
    dealt round robin over the new slots, each with the used samples to skip. From the epoch after, the slot
    reads its share as usual. Written here, not taken from webdataset, because its shard splitting knows
    nothing of what a checkpoint's slots had used."""
    plans: Plans = {}
    for epoch, used in used_samples(shard_set, set_index=set_index, seed=seed, old=old).items():
        order = slot_shards(shard_set.shards, seed, set_index, epoch, 0, 1, True)
        rest = [(entry, used.get(entry["name"]) or frozenset()) for entry in order
                if used.get(entry["name"], frozenset()) is not None]
        plans[epoch] = rest[new_slot::new_num_slots]
    return plans


def mix(streams: list[Iterator[dict]], ratios: list[float], rng: random.Random) -> Iterator[dict]:
    """Endless mixture: each sample comes from stream i with probability ratio_i / sum(ratios)."""
    if len(streams) == 1:
        yield from streams[0]
        return
    index = list(range(len(streams)))
    while True:
        yield next(streams[rng.choices(index, weights=ratios)[0]])


def choose_expression(sentences: list[str], seed: int, epoch: int, key: str, flip_prob: float) -> tuple[int, bool]:
    """One expression per ref per visit (its index), and whether to flip; a function of (seed, epoch, key)."""
    rng = random.Random(f"{seed}-{epoch}-{key}")
    return rng.choice(range(len(sentences))), rng.random() < flip_prob


def prepare(sample: dict, index: int, flip: bool, pre: Preprocessor) -> dict:
    """Decoded sample + the index of the chosen expression -> one item of a batch."""
    image, mask, bbox, meta = sample["image"], sample["mask"], sample["meta"]["bbox"], sample["meta"]
    sentence = meta["sentences"][index]
    if flip:
        image, mask, bbox, sentence = hflip(image, mask, bbox, sentence)
    item = pre(image, mask, bbox)
    item.update({
        "expression": sentence,
        "group": meta["groups"][index],
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
        "groups": [it["group"] for it in items],
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
        # Set by ResumableLoader before each iteration, per logical worker:
        self.resume_states: list[dict | None] = []  # where each worker's stream stands (seek)
        self.worker_plans: list[list[Plans] | None] = []  # or, after an elastic resume: what each set deals it
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
        dealt = self.worker_plans[worker] if self.worker_plans else None
        plans = dealt or [None] * len(self.sets)
        readers = [SetReader(x, set_index=i, seed=self.seed, slot=slot, num_slots=num_slots,
                             shuffle_buffer=self.shuffle_buffer, errors=errors, plans=plans[i])
                   for i, x in enumerate(self.sets)]
        mixer = random.Random(f"{self.seed}-mix-{slot}")
        groups = 0
        saved = self.resume_states[worker] if self.resume_states else None
        if saved is not None:  # seek: read only what the buffers held and the rest of the current shards
            for reader, state in zip(readers, saved["sets"]):
                reader.restore(state)
            load_random(saved["mix"], mixer)
            groups = int(saved["groups"])
            errors.take()  # counted before the restart
        raw = mix(readers, [x.ratio for x in self.sets], mixer)
        while True:
            group = [next(raw) for _ in range(self.batch_size)]
            groups += 1
            position = {"groups": groups, "sets": [r.state() for r in readers], "mix": dump_random(mixer)}
            items, epochs = [], []
            for r in group:
                try:
                    sample = decode_sample(r)
                    index, flip = choose_expression(sample["meta"]["sentences"], self.seed, r["__epoch__"],
                                                    sample["key"], self.flip_prob)
                    items.append(prepare(sample, index, flip, self.pre))
                    epochs.append(r["__epoch__"])
                except SampleError as e:
                    errors.count += 1
                    log.warning("skipping sample in %s: %s", r.get("__url__", "?"), e)
            if not items:
                continue  # every sample of the group was broken: the next group takes its place
            batch = collate(items)
            batch["epochs"] = epochs  # the epoch of its set each sample was read in (sample accounting)
            batch["worker"] = worker
            batch["worker_position"] = position
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
            for index in range(len(sample["meta"]["sentences"])):
                items.append(prepare(sample, index, False, self.pre))
                if len(items) == self.batch_size:
                    yield dict(collate(items), skipped_samples=errors.take())
                    items = []
        if items:
            yield dict(collate(items), skipped_samples=errors.take())

    def _raw(self, slot: int, num_slots: int, errors: _Errors) -> Iterator[dict]:
        for shard, lo, hi in sample_ranges(self.set.shards, slot, num_slots):
            for i, raw in enumerate(shard_samples(shard["path"], errors)):
                if i >= hi:
                    break
                if i >= lo:
                    yield raw


class ResumableLoader:
    """A DataLoader over a :class:`TrainStream` that can say where it is and continue from there.

    Its state holds, per loader worker, the position after that worker's last batch handed out
    (:meth:`SetReader.state` of every set, the mixer's RNG, the group count); a resume seeks there,
    so its cost does not grow with the step it resumes at. The checkpoint that holds it says its format
    (:data:`ppcr.train.checkpoint.STATE_VERSION`), so the state here is read as this version writes it.
    """

    def __init__(self, stream: TrainStream, num_workers: int, prefetch_factor: int = 2) -> None:
        stream.check_slots(num_workers)
        self.stream, self.num_workers, self.prefetch_factor = stream, num_workers, prefetch_factor
        self.batches = 0  # batches handed out so far
        self.layout_start = 0  # batches handed out before this rank and worker layout began (an elastic resume)
        self.positions: list[dict | None] = [None] * max(num_workers, 1)
        self.plans: list[list[Plans] | None] = [None] * max(num_workers, 1)  # per worker, until its first batch
        self.skipped_samples = 0

    def _identity(self) -> dict:
        s = self.stream
        identity = {"world_size": s.world_size, "rank": s.rank, "num_workers": self.num_workers,
                    "batch_size": s.batch_size, "seed": s.seed, "shuffle_buffer": s.shuffle_buffer,
                    "sets": [(x.name, x.ratio, len(x.shards)) for x in s.sets],
                    "shards": {x.name: shards_digest(x.shards) for x in s.sets}}
        excluded = {x.name: fingerprint(x.exclude_images) for x in s.sets if x.exclude_images}
        if excluded:  # only then: a state saved without exclusions matches a stream that drops nothing
            identity["excluded_images"] = excluded
        return identity

    def state_dict(self) -> dict:
        plans = [None if pos is not None or plan is None else [plans_to_json(p or {}) for p in plan]
                 for pos, plan in zip(self.positions, self.plans)]
        return {"batches": self.batches, "layout_start": self.layout_start, "worker_positions": list(self.positions),
                "worker_plans": plans, "skipped_samples": self.skipped_samples, "identity": self._identity()}

    def _check_identity(self, theirs: dict, *, elastic: bool = False) -> None:
        """Refuse a saved state whose stream was another: any setting of the identity but those an elastic
        resume may change (the rank and worker layout, the batch size)."""
        mine = json.loads(json.dumps(self._identity()))
        for k in list(mine) + [k for k in theirs if k not in mine]:  # a key only one side has differs too
            if elastic and k in ("world_size", "rank", "num_workers", "batch_size"):
                continue
            if json.loads(json.dumps(theirs.get(k))) != mine.get(k):
                what = ("the shards' contents (manifest sha256) changed: rebuilt shards give another stream"
                        if k == "shards" else "the same order needs the same setting")
                raise ValueError(f"cannot resume the data stream: '{k}' was {theirs.get(k)!r} when saved and is "
                                 f"{mine.get(k)!r} now; {what}")

    def load_state_dict(self, state: dict) -> None:
        self._check_identity(state["identity"])
        self.batches = int(state["batches"])
        self.layout_start = int(state["layout_start"])
        self.skipped_samples = int(state["skipped_samples"])
        self.positions = list(state["worker_positions"])
        sets = self.stream.sets
        self.plans = [None if p is None else [plans_from_json(x, s) for x, s in zip(p, sets)]
                      for p in state["worker_plans"]]

    def load_elastic(self, states: list[dict]) -> None:
        """Continue the stream that the old ranks' loader ``states`` (one per old rank, in rank order) stand in,
        on this rank and worker layout, which differs: each set's epochs that old slots had begun are dealt again
        over the new slots (:func:`elastic_plans`), less every sample an old slot had used. Guarantee: no sample
        of an epoch is used twice and none is left out, whatever the old and new layouts; the samples that sat
        in shuffle buffers or in prefetched batches (read, not used) are read again. What changes is the order
        within the rest of the epoch. Refused for a state of another stream (seed, sets, shards, buffer)."""
        for state in states:
            self._check_identity(state["identity"], elastic=True)
        s = self.stream
        old_workers = max(int(states[0]["identity"]["num_workers"]), 1)
        per_set: list[list[dict | None]] = [[] for _ in s.sets]  # per set: each old slot's reader state
        for state in states:
            for w in range(old_workers):
                pos = state["worker_positions"][w]
                plan = state["worker_plans"][w]
                for i in range(len(s.sets)):
                    if pos is not None:
                        per_set[i].append(pos["sets"][i])
                    elif plan is not None and plan[i]:  # dealt by an earlier elastic resume, not begun yet
                        per_set[i].append({"epoch": min(int(e) for e in plan[i]), "next_read": [0, 0], "buffer": [],
                                           "plans": plan[i]})
                    else:
                        per_set[i].append(None)
        nw = max(self.num_workers, 1)
        self.plans = [[elastic_plans(x, set_index=i, seed=s.seed, old=per_set[i], new_slot=s.rank * nw + w,
                                     new_num_slots=s.world_size * nw) for i, x in enumerate(s.sets)]
                      for w in range(nw)]
        self.positions = [None] * nw
        self.batches = self.layout_start = int(states[0]["batches"])
        self.skipped_samples = sum(int(st["skipped_samples"]) for st in states) if s.rank == 0 else 0

    def __iter__(self) -> Iterator[dict]:
        nw = max(self.num_workers, 1)
        self.stream.resume_states = list(self.positions)
        self.stream.worker_plans = list(self.plans)
        self.stream.worker_offset = (self.batches - self.layout_start) % nw
        # Its own generator: worker seeding must not draw from the global RNG, which a resumed
        # run restores for dropout. Workers ignore preemption signals: the rank decides.
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            persistent_workers=False, generator=torch.Generator().manual_seed(self.stream.seed),
                            worker_init_fn=ignore_stop_signals,
                            multiprocessing_context=WORKER_CONTEXT if self.num_workers else None)
        for batch in loader:
            self.batches += 1
            worker = batch.pop("worker")
            self.positions[worker] = batch.pop("worker_position")
            self.plans[worker] = None  # in its readers' positions from now on
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
