"""The baseline of the data benchmark: a random-access REFER loader of the kind peer codebases use.

Modelled on LISA's ``ReferSegDataset`` (and the codebases derived from it): the REFER annotations
(refs pickle + instances.json) are held in memory, and every sample opens its image file, decodes
it, decodes its mask from the COCO polygons with pycocotools, and preprocesses on the CPU the way
LISA does (SAM's ``ResizeLongestSide``, then pixel mean/std and padding in float32; a PIL bicubic
resize for the MLLM). It yields the same batch fields as ``ppcr.data.stream`` so that the two loaders
do the same work for the same refs; it exists for comparison only and is not used in training.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ppcr.config import ModelConfig
from ppcr.data.refer import expression_group, load_refs, refer_files, segmentation_to_mask, supercategories
from ppcr.data.stream import collate
from ppcr.data.transforms import xywh_to_norm_cxcywh


class ReferRandomAccess(Dataset):
    """One item per ref of ``split``: image file + pycocotools mask decode + LISA-style preprocessing."""

    def __init__(
        self,
        refer_root: str | Path,
        dataset: str,
        split_by: str,
        images_dir: str | Path,
        split: str,
        m: ModelConfig,
        seed: int = 0,
    ) -> None:
        refs_path, instances_path = refer_files(refer_root, dataset, split_by)
        refs = load_refs(refs_path)
        instances = json.loads(Path(instances_path).read_text())
        self.refs = [r for r in refs if r["split"] == split]
        if not self.refs:
            raise ValueError(f"{refs_path}: no refs in split '{split}'")
        self.anns = {a["id"]: a for a in instances["annotations"]}
        self.images = {im["id"]: im for im in instances["images"]}
        self.cats = {c["id"]: c["name"] for c in instances["categories"]}
        self.supercats = supercategories(instances["categories"])
        self.images_dir, self.dataset, self.seed = Path(images_dir), dataset, seed
        self.resize = ResizeLongestSide(m.sam_image_size)
        self.sam_size, self.mllm_size = m.sam_image_size, m.mllm_image_size
        self.mean = torch.tensor(m.sam_pixel_mean).view(3, 1, 1)
        self.std = torch.tensor(m.sam_pixel_std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> dict:
        ref = self.refs[i]
        ann, info = self.anns[ref["ann_id"]], self.images[ref["image_id"]]
        with Image.open(self.images_dir / info["file_name"]) as im:  # LISA: cv2.imread + cvtColor
            image = np.array(im.convert("RGB"))
        h, w = image.shape[:2]
        mask = segmentation_to_mask(ann["segmentation"], h, w)  # pycocotools frPyObjects + decode
        sentence = random.Random(f"{self.seed}-{ref['ref_id']}").choice(ref["sentences"])
        resized = self.resize.apply_image(image)  # SAM's transform, through PIL
        ih, iw = resized.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float()
        x = F.pad((x - self.mean) / self.std, (0, self.sam_size - iw, 0, self.sam_size - ih))  # LISA's preprocess
        mllm = Image.fromarray(image).resize((self.mllm_size, self.mllm_size), Image.BICUBIC)
        sam_mask = np.array(Image.fromarray(mask).resize((iw, ih), Image.NEAREST))
        return {
            "sam_image": x,
            "mllm_image": torch.from_numpy(np.array(mllm)).permute(2, 0, 1).contiguous(),
            "sam_mask": F.pad(torch.from_numpy(sam_mask), (0, self.sam_size - iw, 0, self.sam_size - ih)),
            "mask": torch.from_numpy(mask),
            "box": xywh_to_norm_cxcywh(ann["bbox"], w, h),
            "original_size": (h, w),
            "input_size": (ih, iw),
            "expression": sentence["sent"],
            "group": expression_group(sentence, self.supercats[ann["category_id"]]),
            "category": self.cats[ann["category_id"]],
            "category_id": ann["category_id"],
            "key": f"{self.dataset}_{ref['ref_id']}",
            "ref_id": ref["ref_id"],
            "dataset": self.dataset,
            "flipped": False,
        }


def build_refer_loader(dataset: ReferRandomAccess, batch_size: int, num_workers: int, seed: int) -> DataLoader:
    """Shuffled batches through a map-style DataLoader, as peers train."""
    sampler = RandomSampler(dataset, replacement=True, num_samples=10**9, generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate)
