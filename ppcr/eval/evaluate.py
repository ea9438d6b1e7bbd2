"""Evaluation of a split by generation (never teacher-forced), spread over ranks without padding the
counts: every expression is predicted on exactly one rank; under ZeRO-3 a rank with fewer
expressions runs repeats of its last one, whose results are thrown away, so that all ranks run the
same forwards."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppcr.config import Config, ShardSetConfig
from ppcr.data.stream import EvalStream, ShardSet
from ppcr.data.transforms import Preprocessor
from ppcr.eval.metrics import SegmentationMetrics
from ppcr.common.distributed import DistInfo, all_ranks_done, all_reduce_sum, device


@dataclass(frozen=True)
class Ablation:
    """Where SAM's box comes from and which prompts SAM gets; ("head", "box+semsp") is PPCR."""

    box_source: str = "head"
    prompts: str = "box+semsp"

    @property
    def name(self) -> str:
        return f"box={self.box_source},sam={self.prompts}"


ABLATIONS = [Ablation("head", "box+semsp"), Ablation("text", "box+semsp"), Ablation("gt", "box+semsp"),
             Ablation("head", "box"), Ablation("head", "semsp")]


def split_items(cfg: Config, spec: ShardSetConfig, dist: DistInfo, limit: int | None = None) -> list[dict]:
    """This rank's share of a split as single expressions; ``limit`` caps the total over ranks."""
    pre = Preprocessor.from_config(cfg.model)
    share = None
    if limit is not None:
        share = limit // dist.world_size + (1 if dist.rank < limit % dist.world_size else 0)
    out: list[dict] = []
    for b in EvalStream(ShardSet.open(cfg.paths.shards_root, spec), pre, 1, dist.rank, dist.world_size):
        if share is not None and len(out) >= share:
            break
        out.append({"sam_image": b["sam_images"][0], "mllm_image": b["mllm_images"][0],
                    "input_size": tuple(b["input_sizes"][0].tolist()),
                    "original_size": tuple(b["original_sizes"][0].tolist()), "mask": b["masks"][0],
                    "box": b["boxes"][0], "expression": b["expressions"][0], "category": b["categories"][0],
                    "key": b["keys"][0]})
    return out


def filler_item(cfg: Config, spec: ShardSetConfig) -> dict:
    """An expression any rank can run (and discard) to keep in step when its own share has run out."""
    return split_items(cfg, spec, DistInfo(rank=0, world_size=1, local_rank=0, node_rank=0), limit=1)[0]


@torch.no_grad()
def evaluate_items(model, items: list[dict], filler: dict, dist: DistInfo, synced: bool,
                   ablation: Ablation = Ablation(), keep: int = 0) -> tuple[dict[str, float], list]:
    """Metrics over every rank's ``items`` (reduced), and up to ``keep`` (item, prediction) pairs."""
    counts = torch.zeros(dist.world_size, dtype=torch.long, device=device())
    counts[dist.rank] = len(items)
    most = int(all_reduce_sum(counts).max()) if synced else len(items)
    was_training = model.training
    model.eval()
    metrics = SegmentationMetrics()
    kept = []
    for i in range(most):
        item = items[i] if i < len(items) else filler
        pred = model.predict_prepared([item], [item["expression"]], agree=all_ranks_done if synced else None,
                                      box_source=ablation.box_source, prompts=ablation.prompts,
                                      gt_box=item["box"] if ablation.box_source == "gt" else None)[0]
        if i < len(items):
            metrics.update(pred.mask, item["mask"] > 0, pred.box, item["box"], pred.text_box)
            if len(kept) < keep:
                kept.append((item, pred))
    model.train(was_training)
    return metrics.reduce().result(), kept
