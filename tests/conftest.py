"""Fixtures built in code: a tiny synthetic REFER dataset and its shard set, made once per session."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils

from ppcr.common.distributed import usable_cores
from ppcr.config import Config, ShardSetConfig, SyntheticConfig, load_config
from ppcr.data import synthetic
from ppcr.data.shards import build_shards, iter_tar_samples, load_manifest


def pytest_configure(config):
    """Under pytest-xdist (`make test`: 2 workers) each worker gets its share of the cores for torch's threads,
    and the processes it starts inherit it (OMP_NUM_THREADS): two workers each spinning 2 threads on 2 cores
    slowed in-process tests 4-fold."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, usable_cores() // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


# The longest test files first (seconds of a serial run, `pytest --durations`). Under `make test` (--dist loadfile
# --no-loadscope-reorder) a free worker takes the next file in this order, so a long file taken last would leave the
# other worker idle at the end. Only the order changes; any order passes.
LONGEST_FIRST = (
    "faults/test_rank_failure.py",
    "test_learning.py",
    "test_run_identity.py",
    "test_gpu_check.py",
    "test_offload.py",
    "test_train.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        path = item.path.relative_to(Path(__file__).parent).as_posix()
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: within a file and among the rest, collection order


TINY_SYNTH = dict(
    seed=7, num_images={"train": 24, "val": 6, "testA": 5, "testB": 5}, min_image_size=160, max_image_size=224
)


@pytest.fixture(scope="session")
def tiny_refer(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("refer")
    cfg = SyntheticConfig(**TINY_SYNTH)
    counts = synthetic.generate(cfg, root / "refer", root / "images", workers=1)
    return {"refer_root": root / "refer", "images": root / "images" / "synthetic", "cfg": cfg, "counts": counts}


@pytest.fixture(scope="session")
def tiny_shards(tiny_refer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "synthetic_unc"
    build_shards(tiny_refer["refer_root"], "synthetic", "unc", tiny_refer["images"], out, workers=1, max_samples=5)
    return out


def make_config(shards_dir: Path, *overrides: str) -> Config:
    """The default recipe pointed at a test shard set, with small batches and no loader workers."""
    return load_config(
        Path(__file__).parent.parent / "launch/configs/default.yaml",
        [
            f"paths.shards_root={shards_dir.parent}",
            f"data.train_sets=[{{name: {shards_dir.name}, split: train}}]",
            "data.num_workers=0",
            "data.shuffle_buffer=16",
            "train.micro_batch_size=3",
            "model.sam_image_size=64",
            "model.mllm_image_size=32",
            *overrides,
        ],
    )


def train_set(shards_dir: Path, split: str = "train", ratio: float = 1.0) -> ShardSetConfig:
    return ShardSetConfig(name=shards_dir.name, split=split, ratio=ratio)


def rewrite_sample(path, index, change):
    """Rewrite one shard with sample ``index`` passed through ``change`` (a real broken-sample fixture)."""
    samples = list(iter_tar_samples(path))
    key = samples[index]["__key__"]
    samples[index] = change(samples[index])
    with open(path, "wb") as f, wds.TarWriter(f) as w:
        for s in samples:
            w.write(s)
    return key


class Payload:
    """Unpickling this runs code: it creates ``marker`` (how a malicious pickle would run anything)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture
def corrupted(tiny_shards, tmp_path):
    """A copy of the set with a truncated shard, an undecodable JPEG, malformed JSON, a missing mask and
    a sample with a pickle member whose unpickling would create ``tmp_path / "pwned"``."""
    out = tmp_path / "corrupt_unc"
    shutil.copytree(tiny_shards, out)
    shards = [out / s["name"] for s in load_manifest(out)["splits"]["train"]["shards"]]
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])
    keys = {
        "jpg": rewrite_sample(shards[1], 1, lambda s: dict(s, jpg=b"\xff\xd8 not a jpeg")),
        "json": rewrite_sample(shards[2], 0, lambda s: dict(s, json=b"{broken")),
        "mask": rewrite_sample(shards[3], 2, lambda s: {k: v for k, v in s.items() if k != "mask.png"}),
        "pyd": rewrite_sample(shards[4], 0, lambda s: dict(s, pyd=pickle.dumps(Payload(tmp_path / "pwned")))),
    }
    return out, shards, keys


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """Tiny random-initialised MLLMs of both families and a tiny SAM, saved like real checkpoints."""
    from ppcr.model.tiny import build_tiny_mllm, save_tiny_sam

    root = tmp_path_factory.mktemp("models")
    cfg = load_config(None)
    paths = {fam: build_tiny_mllm(fam, root / fam) for fam in ("qwen2_5_vl", "llava")}
    paths["sam"] = save_tiny_sam(cfg.model.sam_arch, 256, root / "sam256.pth")
    return paths


def model_config(shards_dir: Path, models: dict, family: str, *overrides: str) -> Config:
    """The test data config plus a tiny model of ``family``; deterministic (no dropout, no flips)."""
    return make_config(
        shards_dir,
        f"model.mllm_path={models[family]}",
        f"model.tiny_family={family}",
        f"model.sam_checkpoint={models['sam']}",
        "model.sam_image_size=256",
        "model.mllm_image_size=112",
        "model.lora.dropout=0.0",
        "data.flip_prob=0.0",
        "train.micro_batch_size=2",
        "model.trainable.vision_tower=false",
        "model.trainable.llm_base=false",
        "model.trainable.sam_image_encoder=false",
        *overrides,
    )


TRAINED_RUN = ("train.max_steps=3", "model.max_new_tokens=6", "train.lr=1e-2", "train.head_lr=1e-2")


@pytest.fixture(scope="session")
def trained_run(tiny_shards, tiny_models, tmp_path_factory) -> Path:
    """A run of 3 steps on 2 ZeRO-3 CPU ranks with the real launcher: a sharded checkpoint to read."""
    from launching import deepspeed_cmd, overrides, run

    runs = tmp_path_factory.mktemp("runs")
    done = run(deepspeed_cmd(overrides(tiny_shards, tiny_models, runs, *TRAINED_RUN, "train.run_name=trained")))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (runs / "trained.stdout").write_text(done.stdout)  # beside the run: for tests that compare with another launch
    return runs / "trained"


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory) -> Path:
    """The trained run exported, under ``model``."""
    from ppcr.model.export import main as export_main

    out = tmp_path_factory.mktemp("export")
    assert export_main(["--checkpoint", str(trained_run), "--out", str(out / "model")]) == 0
    return out


@pytest.fixture(scope="session")
def evaluated_run(trained_run, tiny_shards, tmp_path_factory) -> Path:
    """A copy of the trained run with make eval's outputs for its checkpoint (launch/eval.py --ablations on 8
    expressions of val and of testB): results.json, results.md and the predictions files under eval/<tag>/."""
    from launching import run

    out = tmp_path_factory.mktemp("evaluated") / "trained"
    shutil.copytree(trained_run, out, ignore=shutil.ignore_patterns("eval"))
    sets = f"eval.sets=[{{name: {tiny_shards.name}, split: val}}, {{name: {tiny_shards.name}, split: testB}}]"
    done = run(
        [sys.executable, "launch/eval.py", "--checkpoint", str(out), "--ablations", sets, "eval.max_expressions=8"]
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _write_refer(root, images, annotations, refs, categories=({"id": 1, "name": "thing", "supercategory": "x"},)):
    (root / "refcoco").mkdir(parents=True)
    (root / "refcoco" / "instances.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": list(categories)})
    )
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)


def _ref(ref_id, ann_id, image_id=1, split="train", sents=("the thing",)):
    return {
        "ref_id": ref_id,
        "ann_id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "split": split,
        "sent_ids": list(range(len(sents))),
        "sentences": [{"raw": s, "sent": s, "sent_id": i, "tokens": s.split()} for i, s in enumerate(sents)],
        "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
    }


@pytest.fixture
def handmade(tmp_path):
    """A REFER set in RefCOCO's layout: overlapping polygons, compressed and uncompressed RLE, and
    one bad record of each kind."""
    h, w = 40, 60
    img_dir = tmp_path / "train2014"
    img_dir.mkdir()
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(img_dir / "COCO_train2014_000000000001.jpg")
    images = [
        {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": h, "width": w},
        {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": h, "width": w},
    ]  # no file
    rle_mask = np.zeros((h, w), np.uint8, order="F")
    rle_mask[5:15, 30:50] = 1
    compressed = mask_utils.encode(rle_mask)
    compressed["counts"] = compressed["counts"].decode()
    uncompressed = {"size": [h, w], "counts": []}
    flat, prev, run = rle_mask.flatten(order="F"), 0, 0
    for v in flat:
        if v != prev:
            uncompressed["counts"].append(run)
            prev, run = v, 0
        run += 1
    uncompressed["counts"].append(run)
    annotations = [
        # Two overlapping squares, 10x10 each, overlap 5x5: union area 175.
        {
            "id": 10,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "bbox": [0, 0, 15, 15],
            "area": 175,
            "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10], [5, 5, 15, 5, 15, 15, 5, 15]],
        },
        {
            "id": 11,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "bbox": [30, 5, 20, 10],
            "area": 200,
            "segmentation": compressed,
        },
        {
            "id": 12,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "bbox": [30, 5, 20, 10],
            "area": 200,
            "segmentation": uncompressed,
        },
        {
            "id": 13,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "bbox": [0, 0, 1, 1],
            "area": 0,
            "segmentation": [[0, 0, 0, 0, 0, 0]],
        },  # zero area
        {
            "id": 14,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "bbox": [50, 30, 20, 20],
            "area": 100,
            "segmentation": [[50, 30, 60, 30, 60, 40, 50, 40]],
        },  # box beyond the right edge
        {
            "id": 15,
            "image_id": 2,
            "category_id": 1,
            "iscrowd": 0,
            "bbox": [0, 0, 5, 5],
            "area": 25,
            "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]],
        },
        {
            "id": 16,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "bbox": [0, 0, 5, 5],
            "area": 100,
            "segmentation": [[100, 50, 110, 50, 110, 60, 100, 60]],
        },  # polygon outside the image
    ]
    refs = [
        _ref(0, 10),
        _ref(1, 11, split="val"),
        _ref(2, 12, split="testA"),
        _ref(3, 13),
        _ref(4, 14),
        _ref(5, 15, image_id=2),
        _ref(6, 10, sents=("  ",)),
        _ref(7, 99),
        _ref(8, 10, split="testC"),
        _ref(9, 16),
    ]
    _write_refer(tmp_path, images, annotations, refs)
    return tmp_path, img_dir


def write_refer(
    root: Path, dataset: str, split_by: str, *, images: list[dict], annotations: list[dict], refs: list[dict]
) -> None:
    """REFER files of one dataset and split scheme under ``root``: instances.json and refs(<split_by>).p."""
    d = root / dataset
    d.mkdir(parents=True, exist_ok=True)
    (d / "instances.json").write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "thing", "supercategory": "x"}],
            }
        )
    )
    with open(d / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f)


def coco_image(img_dir: Path, image_id: int, h: int = 48, w: int = 64) -> dict:
    """A plain JPEG named like a COCO train2014 image, and its COCO image entry."""
    name = f"COCO_train2014_{image_id:012d}.jpg"
    if not (img_dir / name).exists():
        Image.fromarray(np.full((h, w, 3), (37 * image_id) % 256, np.uint8)).save(img_dir / name)
    return {"id": image_id, "file_name": name, "height": h, "width": w}


def square_annotation(ann_id: int, image_id: int, x: int = 4, y: int = 4, side: int = 12) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "iscrowd": 0,
        "bbox": [x, y, side, side],
        "area": side * side,
        "segmentation": [[x, y, x + side, y, x + side, y + side, x, y + side]],
    }


@pytest.fixture(scope="session")
def coco_pool(tmp_path_factory) -> dict:
    """Two shard sets of the COCO train2014 pool, refcoco_unc and refcocog_umd, built from REFER files
    made here. refcocog_umd/train shows image 2, one of refcoco_unc/val's images (refs 200 and 201),
    and image 1, one of refcoco_unc/train's (ref 205), beside images of its own."""
    root = tmp_path_factory.mktemp("coco_pool")
    img_dir = root / "train2014"
    img_dir.mkdir()
    layout = {
        ("refcoco", "unc"): [
            (100, 1, "train"),
            (101, 1, "train"),
            (102, 5, "train"),
            (110, 2, "val"),
            (111, 2, "val"),
            (120, 3, "testA"),
            (130, 4, "testB"),
        ],
        ("refcocog", "umd"): [
            (200, 2, "train"),
            (201, 2, "train"),
            (202, 6, "train"),
            (203, 6, "train"),
            (204, 7, "train"),
            (205, 1, "train"),
            (210, 8, "val"),
            (220, 9, "test"),
        ],
    }
    shards = root / "shards"
    for (dataset, split_by), refs in layout.items():
        image_ids = sorted({image_id for _, image_id, _ in refs})
        write_refer(
            root / "refer",
            dataset,
            split_by,
            images=[coco_image(img_dir, i) for i in image_ids],
            annotations=[square_annotation(ref_id, image_id, x=2 + ref_id % 7 * 5) for ref_id, image_id, _ in refs],
            refs=[
                _ref(ref_id, ref_id, image_id=image_id, split=split, sents=(f"the thing {ref_id}", f"object {ref_id}"))
                for ref_id, image_id, split in refs
            ],
        )
        build_shards(
            root / "refer", dataset, split_by, img_dir, shards / f"{dataset}_{split_by}", workers=1, max_samples=2
        )
    return {"shards_root": shards, "layout": layout, "refer_root": root / "refer", "images": img_dir}
