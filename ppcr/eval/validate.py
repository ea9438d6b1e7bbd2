"""Validation during training: generation-based prediction (never teacher-forced) on a fixed slice of
the first eval set, with the paper's metrics, and a grid of predicted masks for TensorBoard.

Beside them, diagnostics of the spatial stage, on a fixed share of the slice per rank: the head's
BoxAcc@0.5 with the ground-truth answers teacher-forced (against the generated one it shows what
decoding loses), the answer's cross-entropy by token role (fixed tokens, 1st, 2nd... digit of each
coordinate), and how much the image moves SpaSP and the head's box when only the MLLM's image
changes (each item given the next different image of the slice). A model that ignores the image shows ~0 there.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from ppcr.common.distributed import DistInfo, all_reduce_sum, device
from ppcr.config import Config
from ppcr.data.transforms import box_pair_iou
from ppcr.eval.evaluate import evaluate_batches, filler_item, forwards_per_expression, groups_of, split_batches
from ppcr.eval.visualize import grid
from ppcr.model.tokens import CE_ROLES


def other_images(images: list[torch.Tensor]) -> list[torch.Tensor]:
    """For each image, the next different one in the list (cyclically; a split's expressions come image
    by image), or its mirror image where all are the same."""
    out = []
    for i, image in enumerate(images):
        others = (images[(i + k) % len(images)] for k in range(1, len(images)))
        out.append(next((o for o in others if not torch.equal(o, image)), image.flip(-1)))
    return out


GROUP_FIGURES = ("cIoU", "BoxAcc@0.5", "count")  # logged per expression group
SHOWN = ("cIoU", "gIoU", "BoxAcc@0.5", "TextBoxAcc@0.5", "tf_BoxAcc@0.5", "image_dependence_spasp")


class Validator:
    """A fixed slice of the first eval set, evaluated by generation every train.val_every steps."""

    def __init__(self, cfg: Config, dist: DistInfo, synced: bool) -> None:
        spec = cfg.eval.sets[0]
        self.name = f"{spec.name}/{spec.split}"
        self.batch_size = cfg.eval.batch_size
        self.items = [
            x
            for b in split_batches(cfg, spec, dist, batch_size=self.batch_size, limit=cfg.train.val_samples)
            for x in b
        ]
        self.total = min(
            cfg.train.val_samples, sum(all_reduce_sum(torch.tensor([len(self.items)], device=device())).tolist())
        )
        self.filler = filler_item(cfg, spec)
        self.groups = groups_of(cfg, spec)
        self.dist, self.synced = dist, synced
        # The same number of items on every rank (ZeRO-3 ranks run their forwards together): a rank whose
        # share is shorter (a split of fewer shards than ranks) pads with the filler and leaves it out.
        self.probe_size = cfg.train.val_samples // dist.world_size
        self.probe = self.items[: self.probe_size]

    def run(
        self, model, should_stop: Callable[[], bool] | None = None
    ) -> tuple[dict[str, float], np.ndarray | None] | None:
        """Metrics (generation, and the diagnostics below) and a picture; None when ``should_stop`` (asked
        between batches, collectively) says so."""
        batches = (self.items[i : i + self.batch_size] for i in range(0, len(self.items), self.batch_size))
        with tqdm(
            total=self.total,
            disable=not self.dist.is_main,
            desc=f"validate {self.name}",
            unit="expr",
            leave=False,
            dynamic_ncols=True,
        ) as bar:
            done = evaluate_batches(
                model,
                batches,
                filler=self.filler,
                dist=self.dist,
                synced=self.synced,
                keep=4,
                groups=self.groups,
                progress=bar,
                should_stop=should_stop,
            )
        if done is None:
            return None
        result = next(iter(done.metrics.values())).result()
        for group, metrics in next(iter(done.groups.values())).items():  # "<group>/cIoU", ... per expression group
            result.update({f"{group}/{k}": v for k, v in metrics.result().items() if k in GROUP_FIGURES})
        result["lm_forwards_per_expression"] = forwards_per_expression(done)
        result.update(self.spatial_diagnostics(model))
        return result, grid(done.shown) if done.shown else None

    @staticmethod
    def summary(result: dict[str, float]) -> str:
        """The console line: the main figures, then each expression group's ('level 0: cIoU 0.512 BoxAcc
        0.600 (20)')."""
        groups = [k[: -len("/count")] for k in result if k.endswith("/count")]
        return " ".join(f"{k} {result[k]:.3f}" for k in SHOWN if k in result) + "".join(
            f"; {g}: cIoU {result[f'{g}/cIoU']:.3f} BoxAcc {result[f'{g}/BoxAcc@0.5']:.3f} "
            f"({int(result[f'{g}/count'])})"
            for g in groups
            if result[f"{g}/count"]
        )

    @torch.no_grad()
    def spatial_diagnostics(self, model) -> dict[str, float]:
        if self.probe_size < 2:
            return {}
        was_training = model.training
        model.eval()
        real = len(self.probe)
        items = self.probe + [self.filler] * (self.probe_size - real)
        args = (
            [it["expression"] for it in items],
            [it["category"] for it in items],
            torch.stack([it["box"] for it in items]),
        )
        images = [it["mllm_image"] for it in items]
        seen = model.teacher_forced_spatial(images, *args)
        other = model.teacher_forced_spatial(other_images(images), *args)
        model.train(was_training)
        spasp, boxes = seen["spasp"][:real], seen["boxes"][:real]
        hits = sum(box_pair_iou(b, it["box"]) >= 0.5 for b, it in zip(boxes, items))
        moved = ((other["spasp"][:real] - spasp).norm(dim=-1) / spasp.norm(dim=-1).clamp(min=1e-12)).sum()
        box_moved = (other["boxes"][:real] - boxes).abs().mean(-1).sum()
        head = torch.tensor([real, hits, float(moved), float(box_moved)], dtype=torch.float64, device=device())
        ce = [seen[k][:real].sum(0).double().to(head.device) for k in ("ce_sums", "ce_counts")]
        sums = all_reduce_sum(torch.cat([head, *ce])).cpu().tolist()
        n, roles = max(sums[0], 1.0), len(CE_ROLES)
        out = {"tf_BoxAcc@0.5": sums[1] / n, "image_dependence_spasp": sums[2] / n, "image_dependence_box": sums[3] / n}
        for role, total, count in zip(CE_ROLES, sums[4 : 4 + roles], sums[4 + roles :]):
            if count:
                out[f"tf_ce_spa_{role}"] = total / count
        return out
