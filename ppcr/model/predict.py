"""Prediction by generation, in batches: both stages decoded for a batch of expressions at once, then
SAM once per prompt set asked for.

The work done once per batch: each distinct image's vision features and SAM image embedding (a
split's expressions come image by image, several per image), each stage's decoding (batched,
:mod:`ppcr.model.generation`), and the box head. What differs between the ablations (where SAM's
box comes from, which prompts SAM gets) is only SAM's mask decoder, so they share one generation.
A row's answer does not depend on the other rows of its batch (tested against batch 1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ppcr.data.transforms import box_pair_iou
from ppcr.model.generation import Agree, greedy_stage
from ppcr.model.lora import use_branch
from ppcr.model.tokens import parse_box_text, render_prompts

BOX_SOURCES = ("head", "text", "gt")  # where SAM's box comes from when predicting
SAM_PROMPTS = ("box+semsp", "box", "semsp")  # which prompts SAM gets when predicting


@dataclass(frozen=True)
class Ablation:
    """Where SAM's box comes from and which prompts SAM gets; ("head", "box+semsp") is PPCR. "gt" (the
    ground-truth box) is an oracle, for analysis only."""

    box_source: str = "head"
    prompts: str = "box+semsp"

    def __post_init__(self) -> None:
        if self.box_source not in BOX_SOURCES or self.prompts not in SAM_PROMPTS:
            raise ValueError(f"unknown ablation box_source={self.box_source!r} prompts={self.prompts!r}")

    @property
    def name(self) -> str:
        return f"box={self.box_source},sam={self.prompts}"


PPCR = Ablation()
ABLATIONS = [
    PPCR,
    Ablation("text", "box+semsp"),
    Ablation("gt", "box+semsp"),
    Ablation("head", "box"),
    Ablation("head", "semsp"),
]


@dataclass
class Prediction:
    semantic_answer: str
    spatial_answer: str
    box: torch.Tensor  # (4,) normalised (cx, cy, w, h) from the box head
    text_box: torch.Tensor | None  # (4,) parsed from the spatial answer, None if it holds no box
    box_agreement: float | None  # IoU of the two boxes
    mask_logits: torch.Tensor  # (H, W) at the image's original resolution
    stopped: dict[str, bool]  # whether each stage generated its [SEM] / [LOC] token
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, for the whole batch

    @property
    def mask(self) -> torch.Tensor:
        return self.mask_logits > 0


@dataclass
class Generated:
    """One batch through both stages and the box head: everything but SAM's mask decoder."""

    semantic_answers: list[str]
    spatial_answers: list[str]
    semsp: torch.Tensor  # (B, H)
    boxes: torch.Tensor  # (B, 4) from the box head
    text_boxes: list[torch.Tensor | None]
    found: list[dict[str, bool]]
    sam_embeddings: torch.Tensor  # (B, C, h, w): one SAM encoder pass per distinct image
    forwards: int  # language-model forwards of both stages
    timings: dict[str, float]


def distinct(images: list[torch.Tensor]) -> tuple[list[int], list[int]]:
    """Indices of the distinct images (first occurrences) and, per image, the index of its distinct one."""
    first: list[int] = []
    inverse: list[int] = []
    for i, image in enumerate(images):
        j = next((k for k, f in enumerate(first) if torch.equal(images[f], image)), None)
        if j is None:
            first.append(i)
            j = len(first) - 1
        inverse.append(j)
    return first, inverse


class _Clock:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.t
        self.t = now


@torch.no_grad()
def generate(model, items: list[dict], expressions: list[str], *, agree: Agree | None = None) -> Generated:
    """Both stages of ``model`` (a PPCRModel, in eval mode) for a batch of preprocessed ``items``
    (:class:`ppcr.data.transforms.Preprocessor` outputs) by greedy generation."""
    clock = _Clock()
    texts = [render_prompts(model.cfg.templates, e) for e in expressions]
    mllm_images = [it["mllm_image"] for it in items]
    first, inverse = distinct(mllm_images)
    s1, vision = model.encode([t["semantic_prompt"] for t in texts], None, mllm_images)
    once = model.family.select_images(vision, first)  # the processor's outputs of the distinct images
    per_image = model.family.split_features(model.vision_features(once), once)
    features = torch.cat([per_image[j] for j in inverse])  # (image tokens of the batch, H)
    sam_images = torch.stack([items[i]["sam_image"] for i in first]).to(model.device)
    sizes = torch.tensor([tuple(items[i]["input_size"]) for i in first])
    sam_embeddings = model.sam.encode(sam_images, sizes.to(model.device))[inverse]
    clock.lap("vision")

    cfg = model.cfg
    use_branch(model.mllm, "semantic")
    d1 = greedy_stage(
        model,
        s1,
        features,
        None,
        marker=model.ids.sem,
        stops=(model.ids.sem,),
        max_new_tokens=cfg.max_new_tokens,
        agree=agree,
    )
    semsp = d1.marker_hidden
    clock.lap("semantic")
    s2, _ = model.encode([t["spatial_prompt"] for t in texts], None, mllm_images)
    use_branch(model.mllm, "spatial")
    d2 = greedy_stage(
        model,
        s2,
        features,
        model.sem_to_llm(semsp),
        marker=model.ids.loc,
        stops=model.spatial_stops,
        max_new_tokens=cfg.max_new_tokens,
        agree=agree,
    )
    boxes = model.locate(d2.marker_hidden, d2.prompt_hidden, s2, features).box
    clock.lap("spatial")
    decode = model.tokenizer.decode
    answers2 = [decode(ids, skip_special_tokens=False) for ids in d2.ids]
    return Generated(
        semantic_answers=[decode(ids, skip_special_tokens=False) for ids in d1.ids],
        spatial_answers=answers2,
        semsp=semsp,
        boxes=boxes,
        text_boxes=[parse_box_text(a, cfg.box_bins) for a in answers2],
        found=[{"semantic": a, "spatial": b} for a, b in zip(d1.found, d2.found)],
        sam_embeddings=sam_embeddings,
        forwards=d1.forwards + d2.forwards,
        timings=clock.timings,
    )


@torch.no_grad()
def masks_for(model, items: list[dict], gen: Generated, ablation: Ablation = PPCR) -> list[torch.Tensor]:
    """Mask logits (H_i, W_i) at each image's original resolution for one ``ablation``. An answer without
    a parsable box falls back to the head's box for box_source "text": one SAM call for the batch, the
    same on every rank, keeps ZeRO-3's gathers in step."""
    boxes = gen.boxes
    if ablation.box_source == "text":
        boxes = torch.stack(
            [t.to(boxes.device, boxes.dtype) if t is not None else b for t, b in zip(gen.text_boxes, gen.boxes)]
        )
    elif ablation.box_source == "gt":
        boxes = torch.stack([it["box"] for it in items]).to(boxes.device, boxes.dtype)
    sizes = torch.tensor([tuple(it["input_size"]) for it in items])
    low = model.decode_masks(
        gen.sam_embeddings,
        None if ablation.prompts == "semsp" else boxes,
        None if ablation.prompts == "box" else gen.semsp,
        sizes,
    )
    return [
        model.sam.to_original(low[i], tuple(it["input_size"]), tuple(it["original_size"])) for i, it in enumerate(items)
    ]


def predict_items(
    model,
    items: list[dict],
    expressions: list[str],
    *,
    agree: Agree | None = None,
    ablations: tuple[Ablation, ...] | list[Ablation] = (PPCR,),
) -> tuple[list[list[Prediction]], Generated]:
    """Predictions per ablation (in ``ablations`` order), each a list over the batch, and the shared
    generation. ``agree`` keeps ZeRO-3 ranks decoding in step."""
    gen = generate(model, items, expressions, agree=agree)
    out = []
    for ablation in ablations:
        clock = _Clock()
        masks = masks_for(model, items, gen, ablation)
        clock.lap("sam")
        timings = {**gen.timings, **clock.timings}
        rows = []
        for i, logits in enumerate(masks):
            box, text_box = gen.boxes[i].float().cpu(), gen.text_boxes[i]
            rows.append(
                Prediction(
                    semantic_answer=gen.semantic_answers[i],
                    spatial_answer=gen.spatial_answers[i],
                    box=box,
                    text_box=text_box,
                    box_agreement=box_pair_iou(box, text_box) if text_box is not None else None,
                    mask_logits=logits.float().cpu(),
                    stopped=gen.found[i],
                    timings=timings,
                )
            )
        out.append(rows)
    return out, gen


def predict(model, images: list[np.ndarray], expressions: list[str], *, batch_size: int = 8) -> list[Prediction]:
    """Segment what each expression refers to in its (H, W, 3) uint8 RGB image, by generation only,
    ``batch_size`` expressions at a time."""
    if len(images) != len(expressions):
        raise ValueError(f"{len(images)} images but {len(expressions)} expressions")
    out: list[Prediction] = []
    for start in range(0, len(images), max(batch_size, 1)):
        chunk = images[start : start + batch_size]
        items = [model.preprocess(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)) for im in chunk]
        out += predict_items(model, items, expressions[start : start + batch_size])[0][0]
    return out
