"""The one typed configuration tree of ppcr.

A run is described by a YAML recipe (``launch/configs/*.yaml``) plus ``key.sub=value`` overrides from
the command line. Both are checked against the dataclasses below before any heavy work starts: an
unknown key, a wrong type or a value outside its choices stops with a message that names the key.
Each dataclass checks its own values when it is built (:func:`need`), so a config built in code is
checked as one loaded from a recipe is. The defaults written here are the only defaults; no other
module invents one.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the config tree; the message names the key."""


def need(ok: bool, key: str, msg: str) -> None:
    """A value check: :class:`ConfigError` naming ``key`` unless ``ok``. Each dataclass checks its fields in
    ``__post_init__`` (also when built in code or by ``dataclasses.replace``; not on assignment) and writes its
    full keys, since it sits at one place in the tree; :class:`ShardSetConfig` and :class:`PretrainStageConfig`,
    which sit at several, have a ``check(key)`` that their parent calls. Checks across sections are Config's."""
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}")


# --------------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------------

Split = Literal["train", "val", "test", "testA", "testB"]


def setting(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A field of the tree with its one-line doc, which ``launch/train.py --help`` lists (:func:`settings_help`)."""
    return field(default=default, default_factory=factory, metadata={"doc": doc})


@dataclass
class SyntheticConfig:
    """The embedded RefCOCO-shaped dataset: sizes, scene layout and expression difficulty."""

    seed: int = setting(0, "the set is a pure function of this seed")
    num_images: dict[str, int] = setting(
        factory=lambda: {"train": 1200, "val": 100, "testA": 100, "testB": 100},
        doc="images per split; refs per image follow from the objects drawn",
    )
    min_objects: int = setting(3, "fewest objects drawn in a scene")
    max_objects: int = setting(6, "most objects drawn in a scene")
    refs_per_image: int = setting(3, "objects of a scene that get referring expressions (at most)")
    sentences_per_ref: int = setting(2, "expressions written for each referred object")
    min_image_size: int = setting(192, "shorter side of the drawn image, pixels")
    max_image_size: int = setting(320, "longer side of the drawn image, pixels")
    difficulty_weights: list[float] = setting(
        factory=lambda: [1.0, 1.0, 1.0],
        doc='weights of the expression levels: 0 unique attributes ("the red circle"), 1 size or position '
        '("the small square on the left"), 2 relations ("the square left of the blue triangle"); a level '
        "is used only when its expression identifies the target uniquely",
    )
    max_occlusion: float = setting(0.35, "largest share of an object another may hide")
    jpeg_quality: int = setting(90, "JPEG quality of the written images")

    def __post_init__(self) -> None:
        need(
            set(self.num_images) <= {"train", "val", "testA", "testB"},
            "data.synthetic.num_images",
            f"splits must be among train, val, testA, testB, got {sorted(self.num_images)}",
        )
        need(all(v >= 0 for v in self.num_images.values()), "data.synthetic.num_images", "counts must be >= 0")
        need(
            1 <= self.min_objects <= self.max_objects,
            "data.synthetic.min_objects",
            f"need 1 <= min_objects <= max_objects, got {self.min_objects} and {self.max_objects}",
        )
        w = self.difficulty_weights
        need(
            len(w) == 3 and all(x >= 0 for x in w) and sum(w) > 0,
            "data.synthetic.difficulty_weights",
            f"three non-negative weights with a positive sum, got {w}",
        )
        need(
            64 <= self.min_image_size <= self.max_image_size,
            "data.synthetic.min_image_size",
            f"need 64 <= min_image_size <= max_image_size, got {self.min_image_size}, {self.max_image_size}",
        )
        need(0.0 <= self.max_occlusion < 1.0, "data.synthetic.max_occlusion", "must lie in [0, 1)")
        need(1 <= self.jpeg_quality <= 100, "data.synthetic.jpeg_quality", "must lie in [1, 100]")
        need(
            self.refs_per_image >= 1 and self.sentences_per_ref >= 1,
            "data.synthetic.refs_per_image",
            "refs_per_image and sentences_per_ref must be >= 1",
        )


@dataclass
class ShardSetConfig:
    """One WebDataset shard set (a directory under paths.shards_root) and its split."""

    name: str = setting("synthetic_unc", "the shard set's directory under paths.shards_root")
    split: Split = setting("train", "the split to read")
    ratio: float = setting(1.0, "mixing weight among the training sets; ignored for evaluation")

    def check(self, key: str) -> None:
        """Its values, as item ``key`` (e.g. ``data.train_sets[0]``) of the list that holds it."""
        need(self.ratio > 0, f"{key}.ratio", f"must be > 0, got {self.ratio}")
        need(bool(self.name), f"{key}.name", "must name a shard set directory")


@dataclass
class DataConfig:
    """What trains on, how it streams, and how shards are built."""

    train_sets: list[ShardSetConfig] = setting(
        factory=lambda: [ShardSetConfig()], doc="the training shard sets, mixed by their ratios"
    )
    num_workers: int = setting(2, "data-loader worker processes per rank (0: load in the rank's own process)")
    shuffle_buffer: int = setting(256, "samples in each loader slot's shuffle buffer")
    flip_prob: float = setting(
        0.5, "probability of a horizontal flip, which swaps 'left' and 'right' in the expression"
    )
    shard_max_samples: int = setting(200, "samples per shard when building")
    shard_max_mb: float = setting(256.0, "megabytes per shard when building, whichever limit comes first")
    max_reject_share: float = setting(0.05, "a shard build exits non-zero past this share of rejected refs")
    exclude_eval_images: bool = setting(
        True,
        "drop every training ref whose image is in a split of eval.sets (RefCOCO, RefCOCO+ and RefCOCOg "
        "share COCO train2014 images; MDETR, SeqTR and PolyFormer remove them: ppcr/data/overlap.py); rank "
        "0 prints what was dropped",
    )
    eval_splits_missing_ok: list[str] = setting(
        factory=list,
        doc="eval splits ('name/split') that may have no shards when training starts: with "
        "exclude_eval_images a missing eval split otherwise stops the run, since its images cannot "
        "be left out of training; make eval flags a split training did not leave out",
    )
    synthetic: SyntheticConfig = setting(factory=SyntheticConfig, doc="the embedded synthetic dataset")

    def __post_init__(self) -> None:
        need(len(self.train_sets) > 0, "data.train_sets", "at least one training shard set")
        for i, s in enumerate(self.train_sets):
            s.check(f"data.train_sets[{i}]")
        for i, name in enumerate(self.eval_splits_missing_ok):
            need(
                name.count("/") == 1 and all(name.split("/")),
                f"data.eval_splits_missing_ok[{i}]",
                f"a split as 'name/split' (e.g. refcoco_unc/val), got {name!r}",
            )
        need(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        need(self.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
        need(0.0 <= self.flip_prob <= 1.0, "data.flip_prob", "must lie in [0, 1]")
        need(self.shard_max_samples >= 1, "data.shard_max_samples", "must be >= 1")
        need(self.shard_max_mb > 0, "data.shard_max_mb", "must be > 0")
        need(0.0 <= self.max_reject_share <= 1.0, "data.max_reject_share", "must lie in [0, 1]")


@dataclass
class SamArchConfig:
    """Shape of a SAM built with ``model.sam_type: tiny``; the released vit_b / vit_l / vit_h fix theirs."""

    encoder_dim: int = setting(64, "image encoder width")
    encoder_depth: int = setting(2, "image encoder blocks")
    encoder_heads: int = setting(2, "image encoder attention heads")
    patch_size: int = setting(16, "image encoder patch side, pixels")
    window_size: int = setting(4, "windowed attention's window side, in patches")
    global_attn_indexes: list[int] = setting(factory=lambda: [1], doc="image encoder blocks with global attention")
    prompt_dim: int = setting(32, "prompt and mask decoder width (256 in the released SAM models)")
    decoder_heads: int = setting(2, "mask decoder attention heads")
    decoder_mlp_dim: int | None = setting(None, "the mask decoder's MLP width; null: 2 x prompt_dim (2048 released)")

    def __post_init__(self) -> None:
        sizes = ("encoder_dim", "encoder_depth", "encoder_heads", "patch_size", "window_size", "prompt_dim")
        for name in (*sizes, "decoder_heads"):
            need(getattr(self, name) >= 1, f"model.sam_arch.{name}", "must be >= 1")
        need(
            self.encoder_dim % self.encoder_heads == 0,
            "model.sam_arch.encoder_heads",
            f"encoder_dim {self.encoder_dim} must divide into {self.encoder_heads} heads",
        )
        # segment_anything's two-way transformer attends from tokens to the image at half the prompt width
        need(
            self.prompt_dim % (2 * self.decoder_heads) == 0,
            "model.sam_arch.decoder_heads",
            f"prompt_dim {self.prompt_dim} / 2 (the decoder's cross-attention width) must divide into "
            f"{self.decoder_heads} heads",
        )
        need(
            all(0 <= i < self.encoder_depth for i in self.global_attn_indexes),
            "model.sam_arch.global_attn_indexes",
            f"{self.global_attn_indexes}: each must be a block index below encoder_depth {self.encoder_depth}",
        )
        need(
            self.decoder_mlp_dim is None or self.decoder_mlp_dim >= 1,
            "model.sam_arch.decoder_mlp_dim",
            "must be >= 1 (or null for 2 x prompt_dim)",
        )


@dataclass
class TinyMllmConfig:
    """Shape of the tiny MLLM ``ppcr-tiny`` builds (``model.tiny_family``); a real checkpoint fixes its own."""

    hidden: int = setting(128, "language model width")
    layers: int = setting(2, "language model layers")
    heads: int = setting(4, "language model attention heads")
    kv_heads: int = setting(2, "language model key/value heads")
    vision_hidden: int = setting(64, "vision tower width")
    vision_depth: int = setting(2, "vision tower layers")
    vision_heads: int = setting(2, "vision tower attention heads")
    vision_mlp_ratio: int = setting(2, "vision tower MLP width over its hidden width")
    patch_size: int = setting(14, "vision patch side in input pixels (Qwen merges 2 x 2 patches per image token)")

    def __post_init__(self) -> None:
        need(min(dataclasses.astuple(self)) >= 1, "model.tiny_mllm", "every size must be >= 1")
        need(
            self.hidden % self.heads == 0 and self.heads % self.kv_heads == 0,
            "model.tiny_mllm.heads",
            "hidden must divide into heads, and heads into kv_heads",
        )
        need(
            self.vision_hidden % self.vision_heads == 0,
            "model.tiny_mllm.vision_heads",
            "vision_hidden must divide into them",
        )


@dataclass
class LoraSettings:
    """Both LoRA branches (semantic, spatial) share these; they go on the language model only."""

    rank: int = setting(8, "LoRA rank")
    alpha: int = setting(16, "LoRA alpha (the update is scaled by alpha / rank)")
    dropout: float = setting(0.05, "dropout on the LoRA input")
    target_modules: list[str] = setting(
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], doc="language-model modules that get LoRA"
    )

    def __post_init__(self) -> None:
        need(
            self.rank >= 1 and self.alpha > 0 and 0.0 <= self.dropout < 1.0,
            "model.lora",
            "rank >= 1, alpha > 0, dropout in [0, 1)",
        )
        need(bool(self.target_modules), "model.lora.target_modules", "name at least one module")


@dataclass
class TemplateConfig:
    """The Semantic and Spatial Prompt Templates and their answers, rendered with the model's chat
    template. Placeholders: {expression}, {category}, {semantic} (the SemSP placeholder token) and
    {box} (the quantised box text)."""

    semantic_prompt: str = setting(
        'Which object does "{expression}" refer to in this image?', "stage 1's prompt; holds {expression}"
    )
    semantic_answer: str = setting("the {category} [SEM]", "stage 1's answer under teacher forcing; ends in [SEM]")
    spatial_prompt: str = setting(
        'The target is {semantic}. Where is "{expression}"? Answer with its box.',
        "stage 2's prompt; holds {expression} and {semantic}",
    )
    spatial_answer: str = setting("[LOC] {box}", "stage 2's answer; [LOC] first: the box head never sees the box text")

    def __post_init__(self) -> None:
        need("{expression}" in self.semantic_prompt, "model.templates.semantic_prompt", "must hold {expression}")
        need(
            "{expression}" in self.spatial_prompt and "{semantic}" in self.spatial_prompt,
            "model.templates.spatial_prompt",
            "must hold {expression} and {semantic}",
        )
        need(self.semantic_answer.rstrip().endswith("[SEM]"), "model.templates.semantic_answer", "must end in [SEM]")
        sa = self.spatial_answer.rstrip()
        # The box head reads the hidden state at [LOC]: under teacher forcing one that had seen the box text
        # would learn to parse the ground-truth digits instead of localising (README, "The model").
        once = sa.count("[LOC]") == 1
        loc_last = sa.endswith("[LOC]") and "{box}" not in sa
        box_after = once and sa.endswith("{box}") and sa.count("{box}") == 1 and sa.index("[LOC]") < sa.index("{box}")
        need(
            once and (loc_last or box_after),
            "model.templates.spatial_answer",
            "must hold [LOC] once and end in it, or end in one {box} written after [LOC] (the box head must not "
            f"see the box text); got {self.spatial_answer!r}",
        )


@dataclass
class TrainableConfig:
    """What trains. LoRA branches, projectors and the box head always do."""

    embeddings: Literal["new_rows", "full"] = setting("new_rows", "input embeddings: new token rows or all")
    lm_head: Literal["new_rows", "full"] = setting("new_rows", "LM head: new token rows or all")
    sam_mask_decoder: bool = setting(True, "SAM's mask decoder")
    sam_prompt_encoder: bool = setting(False, "SAM's prompt encoder")
    sam_image_encoder: bool = setting(False, "SAM's image encoder")
    vision_tower: bool = setting(False, "the MLLM's vision tower (and projector)")
    llm_base: bool = setting(False, "the language model's own weights, beside LoRA (tiny from-scratch runs)")


@dataclass
class ModelConfig:
    """The MLLM, SAM, the LoRA branches, the box head and what trains."""

    mllm_path: str = setting(
        "checkpoints/tiny-qwen2.5-vl",
        "the MLLM: a local save_pretrained directory (config, safetensors weights, tokenizer, processor); or, "
        "only where the user opts in to the network with HF_HUB_OFFLINE=0 (ppcr/offline.py), a hub id "
        "'org/name', downloaded into the hub cache at load",
    )
    mllm_revision: str | None = setting(
        None,
        "for a hub id: the hub commit (or branch, tag) to load; null: the newest when a run starts, which the "
        "run then records here and in its checkpoints, so that resume, make eval and ppcr-export load that "
        "commit",
    )
    tiny_family: Literal["qwen2_5_vl", "llava"] | None = setting(
        "qwen2_5_vl", "which tiny model ppcr-tiny writes to mllm_path when it is missing; null for a real checkpoint"
    )
    tiny_mllm: TinyMllmConfig = setting(factory=TinyMllmConfig, doc="the tiny MLLM's shape")
    mllm_image_size: int = setting(112, "square side of the image handed to the MLLM's processor")
    sam_type: Literal["tiny", "vit_b", "vit_l", "vit_h"] = setting("tiny", "SAM's size: Meta's releases or tiny")
    sam_checkpoint: str = setting(
        "checkpoints/tiny-sam.pth", "SAM's state dict (.pth as Meta publishes it, or .safetensors)"
    )
    sam_arch: SamArchConfig = setting(factory=SamArchConfig, doc="the tiny SAM's shape")
    sam_image_size: int = setting(256, "SAM's longest-side input size (1024 for the released SAM models)")
    sam_pixel_mean: list[float] = setting(
        factory=lambda: [123.675, 116.28, 103.53], doc="SAM's pixel mean (R, G, B); must match the checkpoint's"
    )
    sam_pixel_std: list[float] = setting(
        factory=lambda: [58.395, 57.12, 57.375], doc="SAM's pixel std (R, G, B); must match the checkpoint's"
    )
    lora: LoraSettings = setting(factory=LoraSettings, doc="the LoRA branches")
    templates: TemplateConfig = setting(factory=TemplateConfig, doc="the prompt templates")
    trainable: TrainableConfig = setting(factory=TrainableConfig, doc="what trains")
    box_head: Literal["pointer", "mlp"] = setting(
        "pointer",
        "how SpaSP becomes a box: 'pointer' scores the image tokens with it and reads the box from the "
        "chosen tokens' own boxes (ppcr/model/pointer.py); 'mlp' regresses the box from SpaSP alone "
        "(the ablation)",
    )
    box_head_hidden: int = setting(
        256, "hidden width of either head (the pointer's seeded regressor: the pretrained one's)"
    )
    query_first: bool = setting(
        False,
        "put the prompt's text before the image in each stage's user turn, so that under the causal mask "
        "the image tokens see the expression (the chat template must render content in order: Qwen2-VL's "
        "and the tiny models' do, llava-hf's renders images first and is refused)",
    )
    box_bins: int = setting(
        1000,
        "bins per side of the box text '<box>(x1,y1),(x2,y2)</box>': 1000 is Qwen2-VL's convention; a small "
        "input image cannot resolve that finely (112 px: a tens digit is one pixel)",
    )
    gradient_checkpointing: bool = setting(False, "recompute the MLLM's activations in backward (less memory)")
    dtype: Literal["float32", "bfloat16", "float16"] = setting(
        "float32",
        "the whole model's dtype; float16 is for GPUs without bfloat16 (V100, T4), with "
        "train.precision fp16 (loss scaling)",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = setting(
        "sdpa",
        "the MLLM's attention kernel (transformers' attn_implementation): PyTorch's SDPA, the plain one, "
        "or FlashAttention-2 (the flash-attn package, a GPU and a 16-bit dtype; checked before a run "
        "starts)",
    )
    max_new_tokens: int = setting(40, "tokens generated per stage at most")
    init_from: str | None = setting(
        None,
        "start a new run from a trained PPCR model: an export, a run directory (its latest checkpoint) or a "
        "checkpoint directory; its trained weights replace the base's where this run trains, while the "
        "optimizer, schedule and data start fresh (fine-tuning a released model on new data). Its base "
        "weights must be this run's (checked); a run that has a checkpoint resumes from it instead",
    )

    def __post_init__(self) -> None:
        need(
            bool(self.mllm_path.strip()) and "://" not in self.mllm_path,
            "model.mllm_path",
            f"must be a save_pretrained directory or, with HF_HUB_OFFLINE=0, a hub id 'org/name' (not a URL), "
            f"got {self.mllm_path!r}",
        )
        rev = self.mllm_revision
        need(
            rev is None or (bool(rev) and not any(c.isspace() for c in rev)),
            "model.mllm_revision",
            f"a hub commit, branch or tag without spaces, or null; got {rev!r}",
        )
        for name in ("mllm_image_size", "sam_image_size"):
            need(getattr(self, name) >= 16, f"model.{name}", "must be >= 16")
        need(len(self.sam_pixel_mean) == 3, "model.sam_pixel_mean", "three values (R, G, B)")
        need(
            len(self.sam_pixel_std) == 3 and all(v > 0 for v in self.sam_pixel_std),
            "model.sam_pixel_std",
            "three positive values (R, G, B)",
        )
        need(
            self.sam_image_size % self.sam_arch.patch_size == 0,
            "model.sam_image_size",
            f"must be a multiple of model.sam_arch.patch_size ({self.sam_arch.patch_size})",
        )
        need(
            self.sam_type == "tiny" or self.sam_image_size == 1024,
            "model.sam_image_size",
            f"the released SAM {self.sam_type} takes 1024, got {self.sam_image_size}",
        )
        need(self.max_new_tokens >= 4, "model.max_new_tokens", "must be >= 4")
        need(
            self.init_from is None or bool(self.init_from.strip()),
            "model.init_from",
            "an export, run or checkpoint directory, or null",
        )
        need(2 <= self.box_bins <= 10000, "model.box_bins", f"must lie in [2, 10000], got {self.box_bins}")


@dataclass
class LossWeights:
    """Total = w_ce_sem*CE_A + w_ce_spa*CE_B + w_l1*L1 + w_giou*GIoU + w_bce*BCE + w_dice*Dice, and with the
    pointer box head (model.box_head) + w_point*Point + w_token_box*(w_l1*L1_token + w_giou*GIoU_token)."""

    w_ce_sem: float = setting(1.0, "stage 1's answer cross-entropy")
    w_ce_spa: float = setting(1.0, "stage 2's answer cross-entropy")
    w_l1: float = setting(5.0, "L1 between the head's box and the ground truth")
    w_giou: float = setting(2.0, "GIoU loss between the head's box and the ground truth")
    w_point: float = setting(1.0, "the pointer's cross-entropy over image tokens (ppcr.model.pointer)")
    w_token_box: float = setting(1.0, "the selected tokens' own boxes, on top of w_l1 and w_giou")
    w_bce: float = setting(2.0, "the mask's binary cross-entropy")
    w_dice: float = setting(0.5, "the mask's Dice loss")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            need(getattr(self, f.name) >= 0, f"train.loss.{f.name}", "must be >= 0")


PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # train.precision -> model.dtype


@dataclass
class TrainConfig:
    """The run: batch, steps, optimizer, precision, checkpoints, logging and validation."""

    seed: int = setting(0, "initial weights and data order; each rank's dropout draws from seed + rank")
    micro_batch_size: int = setting(4, "samples per rank per forward")
    grad_accum: int = setting(1, "micro batches per optimizer step")
    global_batch_size: int | None = setting(
        None,
        "samples per optimizer step over all ranks; when set, grad_accum follows from it and the world size "
        "(global_batch_size / (micro_batch_size x world size)), so a recipe keeps its batch on any node count",
    )
    max_steps: int = setting(2000, "optimizer steps")
    lr: float = setting(2e-4, "learning rate of the LoRA branches")
    base_lr: float | None = setting(
        None,
        "learning rate of pretrained weights that train whole (model.trainable: vision_tower, llm_base, full "
        "embeddings and lm_head); null: train.lr",
    )
    head_lr: float = setting(
        1e-3, "learning rate of the SemSP projectors, box head, new token rows or full embeddings and LM head"
    )
    sam_lr: float = setting(1e-4, "learning rate of SAM's mask decoder, and of its other parts when they train")
    weight_decay: float = setting(0.0, "AdamW weight decay, never applied to norms and biases")
    warmup_steps: int = setting(100, "linear warmup steps before the cosine decay")
    min_lr_ratio: float = setting(0.1, "cosine decay ends at this share of each group's lr")
    grad_clip: float = setting(1.0, "gradient norm clipping (0: off)")
    precision: Literal["fp32", "bf16", "fp16"] = setting("fp32", "DeepSpeed's precision; must match model.dtype")
    loss_scale_power: int = setting(
        16,
        "fp16 only: DeepSpeed's dynamic loss scaling starts at 2**loss_scale_power, halves on a gradient "
        "overflow (that step makes no update) and doubles after 1000 steps without one",
    )
    ds_config: str = setting(
        "ds_configs/zero3.json", "DeepSpeed JSON: ZeRO settings; batch, clipping and precision come from the recipe"
    )
    run_name: str = setting("default", "the run directory is <paths.runs_root>/<run_name>")
    save_every: int = setting(500, "steps between checkpoints (and one at the end)")
    keep_last: int = setting(2, "checkpoints kept")
    log_every: int = setting(10, "steps between metric lines (console, metrics.jsonl, TensorBoard)")
    val_every: int = setting(500, "steps between validations on a slice of the first eval set")
    val_samples: int = setting(64, "expressions in that slice, over all ranks (0: no validation)")
    image_every: int = setting(500, "steps between mask grids in TensorBoard")
    max_nonfinite_steps: int = setting(
        3,
        "a micro-batch whose loss is NaN or Inf on any rank gets no backward on every rank, and a step without "
        "a finite micro-batch no update; after this many such steps in a row the run stops",
    )
    sam_gt_box_steps: int = setting(
        0,
        "SAM's box in training: a jittered ground-truth box with a probability that falls linearly from 1 at "
        "step 0 to 0 at this step, the box head's (detached) box otherwise; 0: always the head's box",
    )
    sam_box_jitter: float = setting(
        0.1, "centre shift and log size change of that box, in box sides (standard deviation)"
    )
    sam_gt_box_floor: float = setting(
        0.0,
        "the share of jittered ground-truth boxes never falls below this: a mask decoder trained only on the "
        "head's (poor) boxes forgets how to follow a box",
    )
    halt_at_step: int | None = setting(None, "checkpoint and stop after this step (time-boxed jobs, tests)")
    record_samples: bool = setting(
        False,
        "write every sample each rank trains on (step, key, epoch) to <run>/samples/rank<R>.jsonl: an audit "
        "of the data order, e.g. across an elastic resume (ppcr.train.loop.SampleRecord)",
    )
    profile_at_step: int | None = setting(
        None,
        "profile steps profile_at_step .. profile_at_step + profile_steps - 1: a trace and the split of step "
        "time by stage, in <run>/profile/ (ppcr.train.profiling); null profiles nothing",
    )
    profile_steps: int = setting(2, "steps profiled")
    loss: LossWeights = setting(factory=LossWeights, doc="the loss weights")

    def __post_init__(self) -> None:
        for name in (
            "micro_batch_size",
            "grad_accum",
            "max_steps",
            "max_nonfinite_steps",
            "save_every",
            "keep_last",
            "log_every",
            "val_every",
            "image_every",
            "profile_steps",
        ):
            need(getattr(self, name) >= 1, f"train.{name}", "must be >= 1")
        need(
            self.global_batch_size is None or self.global_batch_size >= self.micro_batch_size,
            "train.global_batch_size",
            f"must be >= train.micro_batch_size ({self.micro_batch_size}) or null",
        )
        need(
            self.sam_gt_box_steps >= 0 and self.sam_box_jitter >= 0,
            "train.sam_gt_box_steps",
            "sam_gt_box_steps and sam_box_jitter must be >= 0",
        )
        need(0.0 <= self.sam_gt_box_floor <= 1.0, "train.sam_gt_box_floor", "must lie in [0, 1]")
        for name in ("lr", "head_lr", "sam_lr"):
            need(getattr(self, name) > 0, f"train.{name}", "must be > 0")
        need(self.base_lr is None or self.base_lr > 0, "train.base_lr", "must be > 0 or null (train.lr)")
        need(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        need(0 <= self.warmup_steps < self.max_steps, "train.warmup_steps", "must lie in [0, train.max_steps)")
        need(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must lie in [0, 1]")
        need(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 turns clipping off)")
        need(self.val_samples >= 0, "train.val_samples", "must be >= 0")
        need(
            self.halt_at_step is None or 1 <= self.halt_at_step <= self.max_steps,
            "train.halt_at_step",
            "must lie in [1, train.max_steps]",
        )
        need(
            self.profile_at_step is None or 1 <= self.profile_at_step <= self.max_steps,
            "train.profile_at_step",
            "must lie in [1, train.max_steps] or be null",
        )
        need(bool(self.run_name) and "/" not in self.run_name, "train.run_name", "a non-empty name without '/'")
        need(0 <= self.loss_scale_power <= 32, "train.loss_scale_power", "must lie in [0, 32]")


@dataclass
class EvalConfig:
    """Evaluation by generation (make eval) and validation during training."""

    sets: list[ShardSetConfig] = setting(
        factory=lambda: [
            ShardSetConfig(split="val"),
            ShardSetConfig(split="testA"),
            ShardSetConfig(split="testB"),
        ],
        doc="the splits evaluated, in order; validation uses the first",
    )
    batch_size: int = setting(8, "expressions decoded together per rank (validation too)")
    max_expressions: int | None = setting(None, "per split, over all ranks; null evaluates every expression")
    on_missing: Literal["fail", "score_zero"] = setting(
        "fail",
        "an expression of the source split missing from the shards (rejected at build, unreadable): stop "
        "the evaluation, or score it as a miss and flag it in the table (ppcr.eval.splits)",
    )

    def __post_init__(self) -> None:
        for i, s in enumerate(self.sets):
            s.check(f"eval.sets[{i}]")
        need(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        need(self.max_expressions is None or self.max_expressions >= 1, "eval.max_expressions", "must be >= 1 or null")


@dataclass
class PretrainStageConfig:
    """One stage of ``ppcr-pretrain``."""

    steps: int = setting(1000, "optimizer steps")
    batch_size: int = setting(16, "scenes per step")
    lr: float = setting(1e-3, "peak learning rate")
    warmup_steps: int = setting(100, "linear warmup steps")

    def check(self, key: str) -> None:
        """Its values, as stage ``key`` (e.g. ``pretrain.vision``)."""
        need(
            self.steps >= 0 and self.batch_size >= 1 and self.lr > 0 and 0 <= self.warmup_steps,
            key,
            "steps >= 0, batch_size >= 1, lr > 0, warmup_steps >= 0",
        )


@dataclass
class PretrainConfig:
    """``ppcr-pretrain``: the tiny backbones' pretraining (``ppcr/pretrain/``) on synthetic scenes drawn
    from a seed of their own, never the dataset's images. Writes model.mllm_path and model.sam_checkpoint."""

    seed: int = setting(1, "scenes of this seed; must differ from data.synthetic.seed")
    vision: PretrainStageConfig = setting(
        factory=lambda: PretrainStageConfig(steps=6000), doc="the vision tower and projector, on per-token targets"
    )
    grounding: PretrainStageConfig = setting(
        factory=lambda: PretrainStageConfig(steps=4000, lr=5e-4),
        doc="the language model, on listing and locating objects in box text",
    )
    sam: PretrainStageConfig = setting(
        factory=lambda: PretrainStageConfig(steps=3000, batch_size=8), doc="SAM, from a box to the object's mask"
    )
    sam_jitter: float = setting(0.1, "box jitter, in box sides (SAM's own training used about 0.1)")
    num_workers: int = setting(1, "scene-drawing processes beside the training process")
    log_every: int = setting(50, "steps between log lines")
    eval_every: int = setting(500, "steps between held-out evaluations")
    eval_scenes: int = setting(64, "held-out scenes (another index range of the pretraining seed)")

    def __post_init__(self) -> None:
        for name in ("vision", "grounding", "sam"):
            getattr(self, name).check(f"pretrain.{name}")
        need(self.sam_jitter >= 0, "pretrain.sam_jitter", "must be >= 0")
        need(
            self.num_workers >= 0 and self.log_every >= 1 and self.eval_every >= 1 and self.eval_scenes >= 1,
            "pretrain",
            "num_workers >= 0, log_every, eval_every and eval_scenes >= 1",
        )


@dataclass
class PathsConfig:
    """Where data, shards and runs live."""

    refer_root: str = setting("data/refer", "REFER files: <refer_root>/<dataset>/refs(<split_by>).p")
    images_root: str = setting("data/images", "images: <images_root>/<dataset>/ for the synthetic set")
    shards_root: str = setting("shards", "shard sets: <shards_root>/<name>/")
    runs_root: str = setting("runs", "run directories: checkpoints, TensorBoard logs, metrics")


@dataclass
class Config:
    """Every setting of ppcr."""

    data: DataConfig = setting(factory=DataConfig, doc="what trains, how it streams and how shards are built")
    model: ModelConfig = setting(
        factory=ModelConfig, doc="the MLLM, SAM, the LoRA branches, the box head and what trains"
    )
    train: TrainConfig = setting(
        factory=TrainConfig, doc="the training run: batch, steps, optimizer, checkpoints, logs"
    )
    eval: EvalConfig = setting(factory=EvalConfig, doc="evaluation by generation (make eval) and validation")
    pretrain: PretrainConfig = setting(factory=PretrainConfig, doc="ppcr-pretrain: the tiny backbones' pretraining")
    paths: PathsConfig = setting(factory=PathsConfig, doc="where data, shards and runs live")

    def __post_init__(self) -> None:
        """The checks across sections; each section has checked its own values when it was built."""
        seed = self.data.synthetic.seed
        need(
            self.pretrain.seed != seed,
            "pretrain.seed",
            f"must differ from data.synthetic.seed ({seed}): pretraining draws its own scenes",
        )
        tr, m = self.train, self.model
        need(
            PRECISION_DTYPE[tr.precision] == m.dtype,
            "train.precision",
            f"'{tr.precision}' must match model.dtype '{m.dtype}' (bf16 with bfloat16, fp16 with float16, fp32 "
            f"with float32)",
        )


def with_dtype(cfg: Config, dtype: str) -> Config:
    """``cfg`` with model.dtype ``dtype`` and the train.precision that goes with it: a model loaded in another
    dtype than it trained in (evaluation, export)."""
    precision = next(p for p, d in PRECISION_DTYPE.items() if d == dtype)
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, dtype=dtype),
        train=dataclasses.replace(cfg.train, precision=precision),
    )


# --------------------------------------------------------------------------------------------------
# Building the tree from plain data, with type checks
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is None:
        return getattr(tp, "__name__", str(tp))
    args = ", ".join(_type_name(a) for a in typing.get_args(tp))
    return f"{getattr(origin, '__name__', str(origin))}[{args}]"


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in that type."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(
                f"config key '{key}': expects a mapping of {tp.__name__} fields, got {value!r} ({type(value).__name__})"
            )
        return _build(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}': must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expects {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expects a list of {_type_name(item_tp)}, got {value!r}")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expects a mapping, got {value!r}")
        return {_convert(k, k_tp, f"{key}.<key>"): _convert(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expects an integer, got {value!r} ({type(value).__name__})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expects a number, got {value!r} ({type(value).__name__})")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a YAML scalar such as 2014 given for a name
        raise ConfigError(f"config key '{key}': expects a string, got {value!r} ({type(value).__name__})")
    raise TypeError(f"config key '{key}': unsupported annotation {tp!r}")  # a bug in this file


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            where = f"under '{prefix}'" if prefix else "at the top level"
            raise ConfigError(f"unknown config key '{key}' (valid keys {where}: {', '.join(names)})")
        kwargs[k] = _convert(v, hints[k], key)
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


def _check_override_path(dotted: str) -> None:
    """Name the first unknown part of an override key before its value is merged anywhere."""
    cls: Any = Config
    walked = []
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return  # inside a dict or list field: checked when the tree is built
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            where = f"under '{'.'.join(walked)}'" if walked else "at the top level"
            raise ConfigError(f"unknown config key '{dotted}' (valid keys {where}: {', '.join(names)})")
        cls = typing.get_type_hints(cls)[part]
        walked.append(part)


def parse_overrides(overrides: list[str]) -> dict:
    """``["data.num_workers=0", "train.seed=3"]`` -> nested dict; values are parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        _check_override_path(key)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': value is not valid YAML ({e})") from e
        _set_path(tree, key, value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Recipe YAML (optional) + overrides -> validated :class:`Config` (types here, values in the dataclasses)."""
    tree: dict = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path} is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"recipe {path} must hold a mapping at the top level")
        tree = loaded or {}
    # Defaults of the tree, then the recipe, then the overrides: lists are replaced, not merged.
    merged = _merge(to_dict(Config()), tree)
    merged = _merge(merged, parse_overrides(overrides or []))
    return _build(Config, merged, "")  # each dataclass checks its values as it is built


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Every key with its type, default and doc, for --help
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One key of the tree as ``--help`` lists it."""

    key: str  # dotted, as an override names it; a list item's fields as key[i].field
    type: str  # in words, e.g. "int or null", "one of: fp32, bf16, fp16"
    default: Any
    doc: str
    section: bool = False  # a group of keys (a nested dataclass), not a value


def _type_label(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of: " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_label(a) for a in args) + (" or null" if len(args) < len(typing.get_args(tp)) else "")
    if origin is list:
        (item,) = typing.get_args(tp)
        return "list of mappings (keys below)" if dataclasses.is_dataclass(item) else f"list of {_type_label(item)}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"mapping of {_type_label(k)} to {_type_label(v)}"
    return getattr(tp, "__name__", str(tp))


def settings(cls: type = Config, prefix: str = "", instance: Any = None) -> list[Setting]:
    """Every key under ``cls``, in the tree's order, with its type, its default (taken from ``instance``, so
    that a nested default such as ``pretrain.vision.steps`` is the tree's) and its doc (the field's
    ``metadata["doc"]``, see :func:`setting`). A nested dataclass is a section followed by its keys; the
    fields of a list's items are listed as ``key[i].field`` with the item class's defaults."""
    instance = cls() if instance is None else instance
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key, tp, value = f"{prefix}{f.name}", hints[f.name], getattr(instance, f.name)
        doc = f.metadata.get("doc", "")
        if dataclasses.is_dataclass(tp):
            out.append(Setting(key, tp.__name__, None, doc, section=True))
            out += settings(tp, f"{key}.", value)
            continue
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        out.append(Setting(key, _type_label(tp), value, doc))
        if dataclasses.is_dataclass(item):
            out += settings(item, f"{key}[i].")
    return out


def _yaml(value: Any) -> str:
    """A value as an override would write it (YAML flow style)."""
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        value = [to_dict(v) for v in value]
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text[:-4].strip() if text.endswith("\n...") else text


def settings_help(width: int = 110) -> str:
    """The list ``--help`` prints: every key, its type, default and doc."""
    import textwrap

    lines = ["settings: override any key below as key.sub=value (the value is YAML); type, default, what it does"]
    for s in settings():
        if s.section:
            lines += ["", f"{s.key}: {s.doc}"]
            continue
        lines.append(f"  {s.key} ({s.type}; default {_yaml(s.default)})")
        lines += textwrap.wrap(s.doc, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)
