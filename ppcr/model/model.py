"""PPCR: Semantic Understanding -> Spatial Grounding -> Instance Segmentation.

One MLLM with two LoRA branches on its language model, a box head, SemSP projectors and SAM:

1. branch "semantic" answers the Semantic Prompt Template, ending in [SEM]; the last-layer hidden
   state there is the Semantic Segmentation Prompt (SemSP);
2. branch "spatial" answers the Spatial Prompt Template, whose placeholder token [SEMP] carries a
   projection of SemSP (so stage 2's losses reach branch A), with the box as text and [LOC]; the
   hidden state at [LOC] (SpaSP) goes through the box head;
3. SAM's mask decoder takes the box and a projection of SemSP as sparse prompts.

Training is teacher-forced (:meth:`PPCRModel.forward`); prediction generates (:meth:`PPCRModel.predict`)
and never sees the ground truth. The image's vision features are computed once and serve both stages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torchvision.ops import box_convert, box_iou

from ppcr.config import LossWeights, ModelConfig
from ppcr.data.transforms import Preprocessor
from ppcr.model.heads import MLP, BoxHead
from ppcr.model.lora import add_branches, use_branch
from ppcr.model.losses import box_losses, mask_losses, text_ce, total_loss
from ppcr.model.mllm import family_of, image_token_id, load_mllm
from ppcr.model.params import apply_policy
from ppcr.model.sam import SamSegmenter, load_sam
from ppcr.model.tokens import TokenRows, add_ppcr_tokens, parse_box_text, render_prompts
from ppcr.profiling import mark


BOX_SOURCES = ("head", "text", "gt")  # where SAM's box comes from when predicting
SAM_PROMPTS = ("box+semsp", "box", "semsp")  # which prompts SAM gets when predicting


@dataclass
class StageInputs:
    """One stage's token batch, right-padded; ``labels`` is -100 outside the answers."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    positions: torch.Tensor  # (B, L) or (3, B, L)
    image_tokens: int  # image tokens in the batch, counted on the host
    labels: torch.Tensor | None = None
    marker: torch.Tensor | None = None  # (B,) position of each answer's [SEM] / [LOC], found on the host


@dataclass
class TrainInputs:
    """A loader batch made ready on the device: both stages' tokens, the MLLM's and SAM's image
    inputs, and the targets."""

    semantic: StageInputs
    spatial: StageInputs
    vision: dict[str, torch.Tensor]  # the MLLM processor's image outputs
    sam_images: torch.Tensor  # (B, 3, S, S)
    sam_masks: torch.Tensor  # (B, S, S) {0, 1}, zero in the padding
    input_sizes: torch.Tensor  # (B, 2) h, w of the image inside SAM's frame
    boxes: torch.Tensor  # (B, 4) normalised cx, cy, w, h


@dataclass
class Prediction:
    semantic_answer: str
    spatial_answer: str
    box: torch.Tensor  # (4,) normalised (cx, cy, w, h) from the box head
    text_box: torch.Tensor | None  # (4,) parsed from the spatial answer, None if it holds no box
    box_agreement: float | None  # IoU of the two boxes
    mask_logits: torch.Tensor  # (H, W) at the image's original resolution
    stopped: dict[str, bool]  # whether each stage produced its [SEM] / [LOC] token
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    @property
    def mask(self) -> torch.Tensor:
        return self.mask_logits > 0


class PPCRModel(nn.Module):
    def __init__(self, mllm: nn.Module, processor, sam: SamSegmenter, cfg: ModelConfig, loss: LossWeights) -> None:
        super().__init__()
        self.cfg, self.loss_weights, self.processor = cfg, loss, processor
        self.tokenizer = processor.tokenizer
        self.ids = add_ppcr_tokens(self.tokenizer, mllm)
        self.image_token_id = image_token_id(mllm)
        if cfg.gradient_checkpointing:
            mllm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.mllm = add_branches(mllm, cfg.lora)
        base = self.mllm.base_model.model
        self.family = family_of(base)
        hidden = base.config.get_text_config().hidden_size
        self.token_rows = TokenRows(base.get_input_embeddings(), base.get_output_embeddings(), self.ids.new,
                                    own_in=cfg.trainable.embeddings == "new_rows",
                                    own_out=cfg.trainable.lm_head == "new_rows")
        self.sem_to_llm = MLP([hidden, hidden, hidden])
        self.sem_to_sam = MLP([hidden, hidden, sam.prompt_dim])
        self.box_head = BoxHead(hidden, cfg.box_head_hidden)
        self.sam = sam
        self.preprocess = Preprocessor.from_config(cfg)
        apply_policy(self, cfg.trainable)

    @classmethod
    def from_config(cls, cfg: ModelConfig, loss: LossWeights) -> "PPCRModel":
        mllm, processor = load_mllm(cfg.mllm_path, cfg.dtype)
        return cls(mllm, processor, SamSegmenter(load_sam(cfg)), cfg, loss)

    @property
    def device(self) -> torch.device:
        return self.box_head.mlp.net[0].weight.device

    # ------------------------------------------------------------------ inputs

    def encode(self, prompts: list[str], answers: list[str] | None, images: list[torch.Tensor],
               marker: int | None = None) -> tuple[StageInputs, dict]:
        """Chat-template the prompts and expand their image tokens (one call of the MLLM's processor for
        the batch), append the answer tokens with labels, pad right. Positions, the image-token count
        and the position of ``marker`` in each answer are worked out here on the host, so that the
        device work needs no synchronisation. Returns the stage inputs and the processor's image
        inputs, both on the model's device."""
        conv = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}] for p in prompts]
        texts = [self.processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conv]
        enc = self.processor(text=texts, images=list(images), return_tensors="pt", padding=True)
        keys = self.family.text_keys()
        keep = enc["attention_mask"].bool()  # the prompt's tokens, whichever side the processor padded
        prompt_ids = [enc["input_ids"][i][keep[i]] for i in range(len(texts))]
        answer_ids = (self.tokenizer(answers, add_special_tokens=False)["input_ids"] if answers is not None
                      else [[] for _ in texts])
        b, length = len(texts), max(len(p) + len(a) for p, a in zip(prompt_ids, answer_ids))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((b, length), pad, dtype=torch.long)
        attention = torch.zeros((b, length), dtype=torch.long)
        labels = torch.full((b, length), -100, dtype=torch.long)
        text_extra = {k: torch.zeros((b, length), dtype=torch.long) for k in keys}
        for i, (ids, answer) in enumerate(zip(prompt_ids, answer_ids)):
            n, m = len(ids), len(answer)
            input_ids[i, :n] = ids
            input_ids[i, n: n + m] = torch.tensor(answer, dtype=torch.long)
            attention[i, : n + m] = 1
            labels[i, n: n + m] = input_ids[i, n: n + m]
            for k in keys:
                text_extra[k][i, :n] = enc[k][i][keep[i]]
        vision = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask") and k not in keys}
        positions = self.family.positions(input_ids, attention, vision, text_extra)
        where = None
        if marker is not None:
            hits = input_ids == marker
            if not bool((hits.sum(-1) == 1).all()):
                name = self.tokenizer.convert_ids_to_tokens(marker)
                raise ValueError(f"every answer must hold exactly one {name}; counts {hits.sum(-1).tolist()}")
            where = hits.int().argmax(-1)
        dev = self.device
        stage = StageInputs(input_ids.to(dev), attention.to(dev), positions.to(dev),
                            image_tokens=int((input_ids == self.image_token_id).sum()),
                            labels=labels.to(dev) if answers is not None else None,
                            marker=where.to(dev) if where is not None else None)
        return stage, {k: v.to(dev) for k, v in vision.items()}

    def vision_features(self, vision: dict) -> torch.Tensor:
        """Image features of every image token, computed once per step for both stages."""
        trainable = any(p.requires_grad for m in self.family.vision_modules for p in m.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            return self.family.image_features(vision)

    def embed(self, stage: StageInputs, features: torch.Tensor, semsp_embed: torch.Tensor | None) -> torch.Tensor:
        """(B, L, H) input embeddings: token rows, image features at image tokens, SemSP at [SEMP]."""
        if stage.image_tokens != features.shape[0]:
            raise ValueError(f"{stage.image_tokens} image tokens but {features.shape[0]} image features")
        e = self.token_rows(stage.input_ids)
        image_mask = stage.input_ids == self.image_token_id
        e = e.masked_scatter(image_mask.unsqueeze(-1).expand_as(e), features.to(e.dtype))
        if semsp_embed is not None:
            e = torch.where((stage.input_ids == self.ids.semp).unsqueeze(-1), semsp_embed[:, None, :].to(e.dtype), e)
        return e

    @staticmethod
    def at_marker(hidden: torch.Tensor, stage: StageInputs) -> torch.Tensor:
        """(B, H): the hidden state at each row's [SEM] / [LOC] (``stage.marker``)."""
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), stage.marker]

    # ------------------------------------------------------------------ training

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Teacher-forced pass over a loader batch; returns every loss term, the weighted total and the
        predicted boxes and low-resolution mask logits."""
        return self.compute(self.prepare(batch))

    def prepare(self, batch: dict) -> TrainInputs:
        """Host side of a training step: render and tokenise both stages, then move everything to the
        device once."""
        with mark("encode"):
            texts = [render_prompts(self.cfg.templates, e, c, b)
                     for e, c, b in zip(batch["expressions"], batch["categories"], batch["boxes"])]
            images = list(batch["mllm_images"])
            s1, vision = self.encode([t["semantic_prompt"] for t in texts], [t["semantic_answer"] for t in texts],
                                     images, marker=self.ids.sem)
            s2, _ = self.encode([t["spatial_prompt"] for t in texts], [t["spatial_answer"] for t in texts], images,
                                marker=self.ids.loc)
            dev = self.device
            return TrainInputs(s1, s2, vision, batch["sam_images"].to(dev), batch["sam_masks"].to(dev),
                               batch["input_sizes"].to(dev), batch["boxes"].to(dev))

    def compute(self, x: TrainInputs) -> dict[str, torch.Tensor]:
        """Device side of a training step. ppcr's code in it never reads a value back from the device (no
        host synchronisation; tests/test_model.py checks it); transformers' attention-mask helpers do."""
        with mark("vision"):
            features = self.vision_features(x.vision)

        with mark("stage1"):
            use_branch(self.mllm, "semantic")
            h1 = self.run_language_model(self.embed(x.semantic, features, None), x.semantic)
            ce_sem = text_ce(self.token_rows.logits(h1), x.semantic.labels)
            semsp = self.at_marker(h1, x.semantic)

        with mark("stage2"):
            use_branch(self.mllm, "spatial")
            h2 = self.run_language_model(self.embed(x.spatial, features, self.sem_to_llm(semsp)), x.spatial)
            ce_spa = text_ce(self.token_rows.logits(h2), x.spatial.labels)
            boxes = self.box_head(self.at_marker(h2, x.spatial))
            l1, giou = box_losses(boxes.float(), x.boxes.float())

        low = self.segment(x.sam_images, boxes.detach(), semsp, x.input_sizes)
        with mark("mask_losses"):
            bce, dice = mask_losses(low, x.sam_masks, x.input_sizes)
        terms = {"ce_sem": ce_sem, "ce_spa": ce_spa, "l1": l1, "giou": giou, "bce": bce, "dice": dice}
        return {"loss": total_loss(terms, self.loss_weights), **terms, "boxes": boxes, "mask_logits": low}

    def run_language_model(self, embeds: torch.Tensor, stage: StageInputs) -> torch.Tensor:
        out = self.family.language_model(inputs_embeds=embeds, attention_mask=stage.attention_mask,
                                         position_ids=stage.positions, use_cache=False)
        return out.last_hidden_state

    def segment(self, sam_images: torch.Tensor, boxes: torch.Tensor | None, semsp: torch.Tensor | None,
                input_sizes: torch.Tensor) -> torch.Tensor:
        """SAM on (B, 3, S, S) uint8 images with boxes (B, 4 normalised cx, cy, w, h) and SemSP (B, H);
        returns (B, S/4, S/4) mask logits."""
        with mark("sam_encoder"):
            embeddings = self.sam.encode(sam_images, input_sizes.to(sam_images.device))
        with mark("sam_decoder"):
            sam_boxes = None
            if boxes is not None:
                hw = input_sizes.to(boxes.device, boxes.dtype)
                scale = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], dim=-1)
                sam_boxes = box_convert(boxes, "cxcywh", "xyxy") * scale  # pixels of SAM's input frame
            sem = self.sem_to_sam(semsp) if semsp is not None else None
            return self.sam.decode(embeddings, sam_boxes, sem)

    # ------------------------------------------------------------------ prediction

    @torch.no_grad()
    def generate(self, stage: StageInputs, features: torch.Tensor, semsp_embed: torch.Tensor | None,
                 stop: int, all_steps: bool = False) -> tuple[list[int], torch.Tensor, bool]:
        """Greedy decoding of one sequence until ``stop``; returns the generated ids, the last-layer
        hidden state at ``stop`` (fed back once, as in training) or at the last token, and whether
        ``stop`` came. ``all_steps`` decodes max_new_tokens steps whatever comes, so that ZeRO-3 ranks,
        which gather parameters together, run the same number of forwards."""
        lm = self.family.language_model
        out = lm(inputs_embeds=self.embed(stage, features, semsp_embed), attention_mask=stage.attention_mask,
                 position_ids=stage.positions, use_cache=True)
        cache, hidden, pos = out.past_key_values, out.last_hidden_state[:, -1], stage.positions
        generated: list[int] = []
        result: tuple[list[int], torch.Tensor, bool] | None = None
        for _ in range(self.cfg.max_new_tokens):
            token = self.token_rows.logits(hidden).argmax(-1)  # (1,)
            if result is None:
                generated.append(int(token))
            pos = self.family.next_position(pos)
            out = lm(inputs_embeds=self.token_rows(token[:, None]), position_ids=pos, past_key_values=cache,
                     use_cache=True)
            cache, hidden = out.past_key_values, out.last_hidden_state[:, -1]
            if result is None and generated[-1] == stop:
                result = (generated, hidden, True)
                if not all_steps:
                    break
        return result if result is not None else (generated, hidden, False)

    @torch.no_grad()
    def predict(self, images: list[np.ndarray], expressions: list[str]) -> list[Prediction]:
        """Segment what each expression refers to in its (H, W, 3) uint8 RGB image, by generation only."""
        if len(images) != len(expressions):
            raise ValueError(f"{len(images)} images but {len(expressions)} expressions")
        items = [self.preprocess(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)) for image in images]
        return self.predict_prepared(items, expressions)

    @torch.no_grad()
    def predict_prepared(self, items: list[dict], expressions: list[str], all_steps: bool = False,
                         box_source: str = "head", prompts: str = "box+semsp",
                         gt_box: torch.Tensor | None = None) -> list[Prediction]:
        """:meth:`predict` on images already through the :class:`Preprocessor` (e.g. loader items).

        Ablations: SAM's box from the box head, from the answer text, or ``gt_box`` (an oracle, for
        analysis only); SAM prompted by box and SemSP, the box alone, or SemSP alone."""
        if box_source not in BOX_SOURCES or prompts not in SAM_PROMPTS:
            raise ValueError(f"unknown ablation box_source={box_source!r} prompts={prompts!r}")
        if box_source == "gt" and gt_box is None:
            raise ValueError("box_source 'gt' needs gt_box")
        results = []
        for item, expression in zip(items, expressions):
            timings: dict[str, float] = {}
            clock = time.perf_counter()

            def lap(name: str) -> None:
                nonlocal clock
                now = time.perf_counter()
                timings[name] = now - clock
                clock = now

            texts = render_prompts(self.cfg.templates, expression)
            s1, vision = self.encode([texts["semantic_prompt"]], None, [item["mllm_image"]])
            features = self.vision_features(vision)
            lap("vision")
            use_branch(self.mllm, "semantic")
            ids1, semsp, stop1 = self.generate(s1, features, None, self.ids.sem, all_steps)
            lap("semantic")
            s2, _ = self.encode([texts["spatial_prompt"]], None, [item["mllm_image"]])
            use_branch(self.mllm, "spatial")
            ids2, spasp, stop2 = self.generate(s2, features, self.sem_to_llm(semsp), self.ids.loc, all_steps)
            box = self.box_head(spasp)[0]
            lap("spatial")
            answer2 = self.tokenizer.decode(ids2, skip_special_tokens=False)
            text_box = parse_box_text(answer2)
            # An answer without a parsable box falls back to the head's box: the same SAM call on every
            # rank keeps ZeRO-3's gathers in step.
            sam_box = {"head": box, "text": text_box if text_box is not None else box, "gt": gt_box}[box_source]
            sam_box = sam_box.to(box.device, box.dtype)[None]
            input_size, original_size = tuple(item["input_size"]), tuple(item["original_size"])
            low = self.segment(item["sam_image"][None].to(self.device), None if prompts == "semsp" else sam_box,
                               None if prompts == "box" else semsp, torch.tensor([input_size]))
            mask_logits = self.sam.to_original(low[0], input_size, original_size)
            lap("sam")
            agreement = None
            if text_box is not None:
                pair = box_convert(torch.stack([box.float().cpu(), text_box]), "cxcywh", "xyxy")
                agreement = float(box_iou(pair[:1], pair[1:])[0, 0])
            results.append(Prediction(
                semantic_answer=self.tokenizer.decode(ids1, skip_special_tokens=False), spatial_answer=answer2,
                box=box.float().cpu(), text_box=text_box, box_agreement=agreement,
                mask_logits=mask_logits.float().cpu(), stopped={"semantic": stop1, "spatial": stop2}, timings=timings))
        return results
