"""PPCR: Semantic Understanding -> Spatial Grounding -> Instance Segmentation.

One MLLM with two LoRA branches on its language model, a box head, SemSP projectors and SAM:

1. branch "semantic" answers the Semantic Prompt Template, ending in [SEM]; the last-layer hidden
   state there is the Semantic Segmentation Prompt (SemSP);
2. branch "spatial" answers the Spatial Prompt Template, whose placeholder token [SEMP] carries a
   projection of SemSP (so stage 2's losses reach branch A), with the box as text and [LOC]; the
   hidden state at [LOC] (SpaSP) goes through the box head;
   and the box head (``model.box_head``): by default SpaSP points at the image tokens and the box is read
   from the chosen tokens' own boxes (:mod:`ppcr.model.pointer`), or an MLP regresses it from SpaSP alone;
3. SAM's mask decoder takes the box and a projection of SemSP as sparse prompts.

Training is teacher-forced (:meth:`PPCRModel.forward`); prediction generates (:mod:`ppcr.model.predict`)
and never sees the ground truth. The image's vision features are computed once and serve both stages.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert

from ppcr.config import LossWeights, ModelConfig
from ppcr.data.transforms import Preprocessor
from ppcr.model.heads import MLP, BoxHead, BoxOutput, ImageTokens
from ppcr.model.inputs import StageInputs, encode_stage, scatter_image_features
from ppcr.model.lora import add_branches, use_branch
from ppcr.model.losses import box_losses, mask_losses, text_ce, total_loss
from ppcr.model.mllm import family_of, image_token_id, load_mllm
from ppcr.model.params import apply_policy
from ppcr.model.pointer import PointerBoxHead, pointer_losses, token_centres, token_cover
from ppcr.model.sam import SamSegmenter, load_sam
from ppcr.model.tokens import CE_ROLES, LOC, TokenRows, add_ppcr_tokens, digit_roles, digit_token_ids, render_prompts
from ppcr.profiling import mark


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
    token_cover: torch.Tensor | None = None  # (B, T) the target's share of each image token (pointer head)
    # SAM's box per sample, when the loop asks for jittered ground-truth boxes (train.sam_gt_box_steps):
    sam_gt_boxes: torch.Tensor | None = None  # (B, 4) jittered ground truth
    use_gt_box: torch.Tensor | None = None  # (B, 1) bool: the jittered ground truth instead of the head's box


def sam_box_choice(
    boxes: torch.Tensor, keys: list[str], step: int, share: float, jitter: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, whether SAM gets a jittered ground-truth box instead of the head's (with probability
    ``share``) and that box: centre moved by N(0, jitter) box sides, sides scaled by exp(N(0, jitter)).
    Drawn from (key, step), so a resumed run draws the same. Early in training the head's boxes are
    poor, and a mask decoder trained on them would learn to ignore the box."""
    gt, use = boxes.clone().float(), torch.zeros(len(keys), 1, dtype=torch.bool)
    for i, key in enumerate(keys):
        rng = np.random.default_rng(zlib.crc32(f"{key}:{step}".encode()))
        use[i, 0] = bool(rng.random() < share)
        n = rng.normal(0.0, jitter, 4) if jitter > 0 else np.zeros(4)
        gt[i, :2] += torch.from_numpy(n[:2]).float() * gt[i, 2:]
        gt[i, 2:] *= torch.from_numpy(np.exp(n[2:])).float()
    return gt.clamp(0.0, 1.0), use


class PPCRModel(nn.Module):
    def __init__(self, mllm: nn.Module, processor, sam: SamSegmenter, cfg: ModelConfig, loss: LossWeights) -> None:
        super().__init__()
        self.cfg, self.loss_weights, self.processor = cfg, loss, processor
        self.tokenizer = processor.tokenizer
        self.ids = add_ppcr_tokens(self.tokenizer, mllm)
        self.digit_ids = digit_token_ids(self.tokenizer)  # for the CE-by-digit-role diagnostic
        self.image_token_id = image_token_id(mllm)
        if cfg.gradient_checkpointing:
            mllm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.mllm = add_branches(mllm, cfg.lora)
        base = self.mllm.base_model.model
        self.family = family_of(base)
        hidden = base.config.get_text_config().hidden_size
        self.token_rows = TokenRows(
            base.get_input_embeddings(),
            base.get_output_embeddings(),
            self.ids.new,
            own_in=cfg.trainable.embeddings == "new_rows",
            own_out=cfg.trainable.lm_head == "new_rows",
        )
        self.sem_to_llm = MLP([hidden, hidden, hidden])
        self.sem_to_sam = MLP([hidden, hidden, sam.prompt_dim])
        self.box_head = (PointerBoxHead if cfg.box_head == "pointer" else BoxHead)(hidden, cfg.box_head_hidden)
        # the pointer's per-token regressor starts from the vision pretraining's, where the MLLM comes with one
        self.box_head_seeded = cfg.box_head == "pointer" and self.box_head.seed_from(cfg.mllm_path)
        self.sam = sam
        # The MLLM loads in model.dtype; the parts built here follow it, so that the model has one dtype
        # (DeepSpeed's ZeRO-3 partitions a module's parameters in flat buffers of one dtype).
        for part in (self.sem_to_llm, self.sem_to_sam, self.box_head, self.sam):
            part.to(getattr(torch, cfg.dtype))
        self.preprocess = Preprocessor.from_config(cfg)
        # Stage 2 ends at [LOC], or at the end of a box text written after it ("[LOC] {box}").
        self.spatial_stops = (
            (self.ids.loc,) if cfg.templates.spatial_answer.rstrip().endswith(LOC) else (self.ids.box_close,)
        )
        apply_policy(self, cfg.trainable)
        if cfg.query_first:
            self._check_query_first()

    def _check_query_first(self) -> None:
        """model.query_first needs a chat template that renders the user turn's content in order."""
        probe, _ = self.encode(["QUERYPROBE"], None, [torch.zeros(3, 16, 16, dtype=torch.uint8)])
        ids = probe.input_ids[0].tolist()
        first_image = ids.index(self.image_token_id)
        text = self.tokenizer.decode(ids[:first_image])
        if "QUERYPROBE" not in text.replace(" ", ""):
            raise ValueError(
                f"model.query_first: the chat template of {self.cfg.mllm_path} renders the image before "
                "the text whatever the content order (llava-hf's does); set model.query_first=false"
            )

    @classmethod
    def from_config(cls, cfg: ModelConfig, loss: LossWeights, *, device_map: str | None = None) -> PPCRModel:
        mllm, processor = load_mllm(
            cfg.mllm_path,
            cfg.dtype,
            attn_implementation=cfg.attn_implementation,
            revision=cfg.mllm_revision,
            device_map=device_map,
        )
        return cls(mllm, processor, SamSegmenter(load_sam(cfg)), cfg, loss)

    @property
    def device(self) -> torch.device:
        return self.token_rows.new_ids.device

    # ------------------------------------------------------------------ inputs

    def encode(
        self, prompts: list[str], answers: list[str] | None, images: list[torch.Tensor], marker: int | None = None
    ) -> tuple[StageInputs, dict]:
        """One stage's batch on the model's device (:func:`ppcr.model.inputs.encode_stage`)."""
        return encode_stage(
            self.processor,
            self.family,
            self.image_token_id,
            prompts,
            answers,
            images,
            marker=marker,
            query_first=self.cfg.query_first,
            device=self.device,
        )

    def encode_answers(
        self, mllm_images, expressions: list[str], categories: list[str], boxes: torch.Tensor
    ) -> tuple[StageInputs, StageInputs, dict]:
        """Both stages with their ground-truth answers (training's view): the semantic and spatial stage
        inputs and the processor's image inputs, on the model's device."""
        texts = [
            render_prompts(self.cfg.templates, e, c, b, self.cfg.box_bins)
            for e, c, b in zip(expressions, categories, boxes)
        ]
        images = list(mllm_images)
        s1, vision = self.encode(
            [t["semantic_prompt"] for t in texts], [t["semantic_answer"] for t in texts], images, marker=self.ids.sem
        )
        s2, _ = self.encode(
            [t["spatial_prompt"] for t in texts], [t["spatial_answer"] for t in texts], images, marker=self.ids.loc
        )
        return s1, s2, vision

    def vision_features(self, vision: dict) -> torch.Tensor:
        """Image features of every image token, computed once per step for both stages."""
        trainable = any(p.requires_grad for m in self.family.vision_modules for p in m.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            return self.family.image_features(vision)

    def embed(self, stage: StageInputs, features: torch.Tensor, semsp_embed: torch.Tensor | None) -> torch.Tensor:
        """(B, L, H) input embeddings: token rows, image features at image tokens, SemSP at [SEMP]."""
        if stage.image_tokens != features.shape[0]:
            raise ValueError(f"{stage.image_tokens} image tokens but {features.shape[0]} image features")
        e = scatter_image_features(self.token_rows(stage.input_ids), stage.input_ids, self.image_token_id, features)
        if semsp_embed is not None:
            e = torch.where((stage.input_ids == self.ids.semp).unsqueeze(-1), semsp_embed[:, None, :].to(e.dtype), e)
        return e

    def image_tokens(self, states: torch.Tensor, stage: StageInputs, features: torch.Tensor) -> ImageTokens:
        """What the box head reads of each row's image: the spatial stage's last-layer ``states`` (B, L, H)
        at the image tokens, the vision ``features`` (B * T, H) put there, and the tokens' cell centres."""
        b, t = stage.image_positions.shape
        picked = states.gather(1, stage.image_positions.unsqueeze(-1).expand(b, t, states.shape[-1]))
        return ImageTokens(
            states=picked,
            features=features.view(b, t, -1).to(states.dtype),
            centres=token_centres(stage.token_grid, device=states.device),
        )

    def locate(
        self, spasp: torch.Tensor, states: torch.Tensor, stage: StageInputs, features: torch.Tensor
    ) -> BoxOutput:
        """The box head on SpaSP (B, H); the pointer also reads the image tokens of the spatial stage
        (``states`` (B, L, H), its last-layer states; ``features`` (B * T, H), the vision features)."""
        if self.cfg.box_head == "mlp":
            return self.box_head(spasp)
        return self.box_head(spasp, self.image_tokens(states, stage, features))

    @staticmethod
    def at_marker(hidden: torch.Tensor, stage: StageInputs) -> torch.Tensor:
        """(B, H): the hidden state at each row's [SEM] / [LOC] (``stage.marker``)."""
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), stage.marker]

    # ------------------------------------------------------------------ training

    def forward(self, batch: dict) -> dict:
        """Teacher-forced pass over a loader batch; returns every loss term, the weighted total, the
        predicted boxes and low-resolution mask logits, and ``tokens``: each stage's token counts
        (:meth:`ppcr.model.inputs.StageInputs.counts`, host integers)."""
        return self.compute(self.prepare(batch))

    def prepare(self, batch: dict) -> TrainInputs:
        """Host side of a training step: render and tokenise both stages, then move everything to the
        device once."""
        with mark("encode"):
            s1, s2, vision = self.encode_answers(
                batch["mllm_images"], batch["expressions"], batch["categories"], batch["boxes"]
            )
            dev = self.device
            gt_boxes = use_gt = cover = None
            if self.cfg.box_head == "pointer":  # the pointer's target, from the mask on the host
                cover = token_cover(batch["sam_masks"], batch["input_sizes"], s2.token_grid).to(dev)
            if batch.get("gt_box_share", 0.0) > 0:
                gt_boxes, use_gt = sam_box_choice(
                    batch["boxes"], batch["keys"], batch["step"], batch["gt_box_share"], batch["gt_box_jitter"]
                )
                gt_boxes, use_gt = gt_boxes.to(dev), use_gt.to(dev)
            return TrainInputs(
                s1,
                s2,
                vision,
                batch["sam_images"].to(dev),
                batch["sam_masks"].to(dev),
                batch["input_sizes"].to(dev),
                batch["boxes"].to(dev),
                cover,
                gt_boxes,
                use_gt,
            )

    def compute(self, x: TrainInputs) -> dict:
        """Device side of a training step. ppcr's code in it never reads a value back from the device (no
        host synchronisation; tests/test_model.py checks it); transformers' attention-mask helpers do."""
        with mark("vision"):
            features = self.vision_features(x.vision)

        h = self.language_stages(x.semantic, x.spatial, features)
        ce_sem = text_ce(h["h1"], x.semantic, self.token_rows.logits)
        ce_spa = text_ce(h["h2"], x.spatial, self.token_rows.logits)
        semsp = h["semsp"]
        located = self.locate(h["spasp"], h["h2"], x.spatial, features)
        boxes = located.box
        l1, giou = box_losses(boxes.float(), x.boxes.float())
        zero = l1.new_zeros(())
        tokens = {"point": zero, "token_l1": zero, "token_giou": zero}
        if located.token_logits is not None:
            tokens = pointer_losses(located, x.token_cover, x.boxes)

        sam_boxes = boxes.detach()
        if x.use_gt_box is not None:
            sam_boxes = torch.where(x.use_gt_box, x.sam_gt_boxes.to(sam_boxes.dtype), sam_boxes)
        low = self.segment(x.sam_images, sam_boxes, semsp, x.input_sizes)
        with mark("mask_losses"):
            bce, dice = mask_losses(low, x.sam_masks, x.input_sizes)
        terms = {"ce_sem": ce_sem, "ce_spa": ce_spa, "l1": l1, "giou": giou, **tokens, "bce": bce, "dice": dice}
        return {
            "loss": total_loss(terms, self.loss_weights),
            **terms,
            "boxes": boxes,
            "mask_logits": low,
            "tokens": {"semantic": x.semantic.counts(), "spatial": x.spatial.counts()},
        }

    def language_stages(self, semantic: StageInputs, spatial: StageInputs, features: torch.Tensor) -> dict:
        """Both stages teacher-forced: last-layer hidden states h1 (B, L1, H) and h2 (B, L2, H), SemSP and
        SpaSP (B, H) at [SEM] and [LOC]."""
        with mark("stage1"):
            use_branch(self.mllm, "semantic")
            h1 = self.run_language_model(self.embed(semantic, features, None), semantic)
            semsp = self.at_marker(h1, semantic)
        with mark("stage2"):
            use_branch(self.mllm, "spatial")
            h2 = self.run_language_model(self.embed(spatial, features, self.sem_to_llm(semsp)), spatial)
        return {"h1": h1, "semsp": semsp, "h2": h2, "spasp": self.at_marker(h2, spatial)}

    @torch.no_grad()
    def teacher_forced_spatial(
        self, mllm_images: list[torch.Tensor], expressions: list[str], categories: list[str], boxes: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The training view of the spatial stage, for diagnostics, with the ground-truth answers
        teacher-forced: SpaSP (B, H), the head's boxes (B, 4), and per sample the summed cross-entropy and
        count of the answer tokens by role (``ce_sums``, ``ce_counts``: (B, R) in
        :data:`ppcr.model.tokens.CE_ROLES` order: the fixed tokens, then the 1st, 2nd, 3rd... digit of each
        coordinate). The averaged CE hides whether the leading digits, the ones that matter, are learned."""
        s1, s2, vision = self.encode_answers(mllm_images, expressions, categories, boxes)
        features = self.vision_features(vision)
        h = self.language_stages(s1, s2, features)
        labels = s2.labels[:, 1:]
        ce = F.cross_entropy(
            self.token_rows.logits(h["h2"])[:, :-1].flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=-100,
            reduction="none",
        ).view_as(labels)
        roles = digit_roles(labels, self.digit_ids)
        n, answer = len(CE_ROLES), (roles >= 0).float()
        slot = (torch.arange(len(labels), device=ce.device)[:, None] * n + roles.clamp(min=0)).flatten()
        sums = torch.zeros(len(labels) * n, device=ce.device).index_add_(0, slot, (ce * answer).flatten()).view(-1, n)
        counts = torch.zeros(len(labels) * n, device=ce.device).index_add_(0, slot, answer.flatten()).view(-1, n)
        boxes = self.locate(h["spasp"], h["h2"], s2, features).box
        return {"spasp": h["spasp"], "boxes": boxes, "ce_sums": sums, "ce_counts": counts}

    def run_language_model(self, embeds: torch.Tensor, stage: StageInputs) -> torch.Tensor:
        out = self.family.language_model(
            inputs_embeds=embeds, attention_mask=stage.attention_mask, position_ids=stage.positions, use_cache=False
        )
        return out.last_hidden_state

    def segment(
        self,
        sam_images: torch.Tensor,
        boxes: torch.Tensor | None,
        semsp: torch.Tensor | None,
        input_sizes: torch.Tensor,
    ) -> torch.Tensor:
        """SAM on (B, 3, S, S) uint8 images with boxes (B, 4 normalised cx, cy, w, h) and SemSP (B, H);
        returns (B, S/4, S/4) mask logits."""
        with mark("sam_encoder"):
            embeddings = self.sam.encode(sam_images, input_sizes.to(sam_images.device))
        return self.decode_masks(embeddings, boxes, semsp, input_sizes)

    def decode_masks(
        self,
        embeddings: torch.Tensor,
        boxes: torch.Tensor | None,
        semsp: torch.Tensor | None,
        input_sizes: torch.Tensor,
    ) -> torch.Tensor:
        """SAM's mask decoder on image embeddings (B, C, h, w) (:meth:`segment`)."""
        with mark("sam_decoder"):
            sam_boxes = None
            if boxes is not None:
                hw = input_sizes.to(boxes.device, torch.float32)
                scale = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], dim=-1)
                # pixels of SAM's input frame, in fp32 whatever the model's dtype (see SamSegmenter._apply)
                sam_boxes = box_convert(boxes.float(), "cxcywh", "xyxy") * scale
            sem = self.sem_to_sam(semsp) if semsp is not None else None
            return self.sam.decode(embeddings, sam_boxes, sem)
