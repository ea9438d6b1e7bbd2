"""Per-GPU memory of the real recipes on paper, and what ZeRO-3 should hold per rank in small.

The two real recipes (Qwen2.5-VL-7B + SAM ViT-H, LLaVA-1.5-7B + SAM ViT-H) are built as the real
:class:`~ppcr.model.model.PPCRModel` on the meta device from the published configs, so that their
parameter counts are exactly what training prints. Model-state memory comes from DeepSpeed's own
estimators, activations from the formulas in :func:`activation_memory`; both are combined into a
table of ZeRO-2 / ZeRO-3 / ZeRO-3 + offload on 8 x 24 GB and 8 x 80 GB GPUs, with the size of one
checkpoint and the memory of a model loaded from one on an eval rank (:func:`checkpoint_bytes`,
:func:`eval_model_bytes`).
:func:`expected_zero3_bytes_per_rank` maps the estimator onto the tiny fp32 model, to be put beside
what :func:`ppcr.train.memory.model_state_bytes` measures at 1 and 2 ranks.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from deepspeed.runtime.zero.stage3 import (
    estimate_zero3_model_states_mem_needs,
    model_to_params,
)
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

from ppcr.bench.report import table
from ppcr.config import Config, load_config
from ppcr.model.model import PPCRModel
from ppcr.model.params import parameter_counts, parameter_table
from ppcr.model.sam import SamSegmenter, build_sam, sam_arch
from ppcr.model.tiny import LLAVA_SPECIAL, QWEN_SPECIAL, build_processor, build_tokenizer
from ppcr.model.tokens import NEW_TOKENS, render_prompts

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {  # name -> (recipe, MLLM family)
    "qwen2.5-vl-7b": (ROOT / "launch/configs/qwen2.5-vl-7b_sam-vit-h_refcoco.yaml", "qwen2_5_vl"),
    "llava-1.5-7b": (ROOT / "launch/configs/llava-1.5-7b_sam-vit-h_refcoco.yaml", "llava"),
}

# The published config.json files, verbatim (transformers reads the flat legacy layout):
# https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/main/config.json
QWEN2_5_VL_7B_INSTRUCT: dict = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}
# https://huggingface.co/llava-hf/llava-1.5-7b-hf/blob/main/config.json; the text config is partial, the
# rest are LlamaConfig's defaults, which are Llama-2-7B's (= lmsys/vicuna-7b-v1.5): hidden 4096,
# intermediate 11008, 32 layers, 32 heads, 32 KV heads.
LLAVA_1_5_7B_HF: dict = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.36.0.dev0",
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}
# len(tokenizer) of the real releases: Qwen2.5's 151643 BPE tokens + 22 special ones; Llama's 32000 +
# <image> (32000) + <pad> (32001). PPCR's 5 tokens get the next ids, below the embedding rows (152064,
# 32064), so PPCRModel never resizes the embeddings and the meta-device counts are exact.
REAL_TOKENIZER_LEN = {"qwen2_5_vl": 151665, "llava": 32002}

GIB = 2**30
GPU_SETUPS = {"8x24GB": (8, 24.0), "8x80GB": (8, 80.0)}  # GPUs per node, GiB per GPU (24 GB cards hold 24 GiB)
# CUDA context (~0.5 GiB), NCCL and ZeRO's communication buckets (reduce 5e7 + prefetch 5e7 elements in
# 16-bit, ~0.2 GiB) and allocator fragmentation, per GPU.
ALLOWANCE_GIB = 1.5
STAGES = ("zero2", "zero3", "zero3_offload")
STAGE_NAMES = {"zero2": "ZeRO-2", "zero3": "ZeRO-3", "zero3_offload": "ZeRO-3 + offload"}
# A long RefCOCOg-style expression (longer than most RefCOCO ones: memory wants the long end).
TYPICAL_EXPRESSION = "the woman in the white shirt on the left holding a black umbrella"
TYPICAL_CATEGORY = "person"
TYPICAL_BOX = (0.42, 0.55, 0.31, 0.62)  # normalised (cx, cy, w, h)
TEXT_ROUND = 32  # text tokens per stage are rounded up to a multiple of this


@dataclass
class RecipeModel:
    """A real recipe's PPCRModel on the meta device and what it counts."""

    name: str
    cfg: Config
    family: str
    model: PPCRModel
    processor: object
    counts: OrderedDict[str, tuple[int, int]]  # parameter_counts: component -> (trainable, frozen)
    largest_layer: int  # the most parameters one module owns (DeepSpeed's model_to_params)
    buffer_bytes: int = 0  # persistent buffers, which every checkpoint holds

    @property
    def trainable(self) -> int:
        return sum(t for t, _ in self.counts.values())

    @property
    def frozen(self) -> int:
        return sum(f for _, f in self.counts.values())

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


def published_config(family: str, layers: int | None = None) -> dict:
    """The family's published config.json (a copy), with the depth shrunk to ``layers`` when given: the
    language model's layers and the vision tower's blocks, every width kept. Qwen2.5-VL's vision tower
    keeps the published full-attention blocks below ``layers`` (the last block when none is); LLaVA's
    CLIP keeps ``layers`` layers, of which it reads the second to last (``vision_feature_layer`` -2)."""
    if family not in REAL_TOKENIZER_LEN:
        raise ValueError(f"unknown MLLM family '{family}' (choose from {', '.join(REAL_TOKENIZER_LEN)})")
    config = copy.deepcopy(QWEN2_5_VL_7B_INSTRUCT if family == "qwen2_5_vl" else LLAVA_1_5_7B_HF)
    if layers is None:
        return config
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    if family == "qwen2_5_vl":
        config["num_hidden_layers"] = layers
        vision = config["vision_config"]
        vision["depth"] = layers
        vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < layers] or [layers - 1]
    else:
        config["text_config"]["num_hidden_layers"] = layers
        config["vision_config"]["num_hidden_layers"] = layers
    return config


def mllm_config(family: str, config: dict):
    """transformers' config object of ``family`` from a config.json dict (the flat legacy layout too)."""
    return (Qwen2_5_VLConfig if family == "qwen2_5_vl" else LlavaConfig).from_dict(config)


def _published_mllm(family: str, layers: int | None = None) -> nn.Module:
    """The published architecture with transformers' own class, on the meta device (no weights), its
    depth shrunk to ``layers`` when given (:func:`published_config`)."""
    cls = Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl" else LlavaForConditionalGeneration
    with torch.device("meta"):
        return cls(mllm_config(family, published_config(family, layers)))


def _processor(family: str, image_size: int) -> object:
    """The family's processor around the tiny tokenizer (a proxy for the real one, which is not on
    disk), so that prompts render through a chat template and image tokens expand as in training."""
    if family == "qwen2_5_vl":
        v = QWEN2_5_VL_7B_INSTRUCT["vision_config"]
        return build_processor(
            family,
            image_size,
            build_tokenizer(QWEN_SPECIAL, family),
            v["patch_size"],
            v["spatial_merge_size"],
            v["temporal_patch_size"],
        )
    return build_processor(
        family, image_size, build_tokenizer(LLAVA_SPECIAL, family), LLAVA_1_5_7B_HF["vision_config"]["patch_size"]
    )


def build_meta_model(
    name: str, *, overrides: list[str] | tuple[str, ...] = (), layers: int | None = None
) -> RecipeModel:
    """The recipe's PPCRModel exactly as training constructs it (LoRA, token rows, heads, policy), on meta:
    the recipe with ``overrides``, the published MLLM shrunk to ``layers`` when given, and SAM from the
    registry (``model.sam_type`` vit_b/l/h) or, for ``tiny``, built at ``model.sam_arch`` as training does."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe '{name}' (choose from {', '.join(RECIPES)})")
    recipe, mllm_type = RECIPES[name]
    cfg = load_config(recipe, list(overrides))
    mllm = _published_mllm(mllm_type, layers)
    rows = mllm.get_input_embeddings().weight.shape[0]
    if REAL_TOKENIZER_LEN[mllm_type] + len(NEW_TOKENS) > rows:
        raise ValueError(f"{name}: the real tokenizer plus PPCR's tokens would outgrow {rows} embedding rows")
    processor = _processor(mllm_type, cfg.model.mllm_image_size)
    with torch.device("meta"):
        sam = build_sam(sam_arch(cfg.model), cfg.model.sam_image_size)
        model = PPCRModel(mllm, processor, SamSegmenter(sam), cfg.model, cfg.train.loss)
    if model.mllm.base_model.model.get_input_embeddings().weight.shape[0] != rows:
        raise AssertionError(f"{name}: PPCRModel resized the embeddings; the counts would not be the real ones")
    # model_to_params also returns a total, deduplicated by data_ptr(): every meta tensor has data_ptr 0,
    # so that total is wrong on meta; the largest layer (a sum of numel per module) is right.
    _, largest = model_to_params(model)
    return RecipeModel(
        name, cfg, mllm_type, model, processor, parameter_counts(model), largest, persistent_buffer_bytes(model)
    )


def persistent_buffer_bytes(model: nn.Module) -> int:
    """Bytes of the buffers in ``model.state_dict()`` (meta tensors know their size)."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return sum(v.numel() * v.element_size() for k, v in model.state_dict().items() if k not in params)


def model_summary(rm: RecipeModel) -> dict[str, object]:
    """Total, trainable, frozen and largest-layer parameters, and the per-component table."""
    return {
        "recipe": rm.name,
        "total": rm.total,
        "trainable": rm.trainable,
        "frozen": rm.frozen,
        "largest_layer": rm.largest_layer,
        "counts": dict(rm.counts),
        "table": parameter_table(rm.model),
    }


# ---------------------------------------------------------------------------------------------- model states


def model_state_memory(
    trainable: int, frozen: int, largest_layer: int, num_gpus_per_node: int = 8, num_nodes: int = 1
) -> dict[str, dict[str, int]]:
    """Bytes per GPU and per node CPU of the model states under ZeRO-2, ZeRO-3 and ZeRO-3 + offload.

    DeepSpeed's estimators assume every parameter trains (ZeRO-2: 2 bytes of 16-bit weights on every
    GPU plus 18 partitioned, for 16-bit and fp32 gradients, fp32 master and Adam's two moments;
    ZeRO-3: 18 partitioned, plus the gathered largest layer). Here most parameters are frozen,
    so the estimator gets the trainable ones (``estimator_*``), and the frozen parameters' 16-bit
    weights are added apart (``frozen_*``): 2 bytes each, replicated on every GPU under ZeRO-2,
    partitioned 1/N under ZeRO-3, in the node's CPU memory under offload_param (ds_configs/
    zero3_offload.json). ZeRO-3's largest-layer term (4 bytes per parameter of the largest module,
    gathered with its gradient) takes the largest module overall, a frozen embedding here, since ZeRO-3
    gathers frozen layers too. CPU without offload is DeepSpeed's figure at model load: for ZeRO-2
    every rank also loads all frozen weights in 16-bit (worst case, no page sharing); ZeRO-3's zero.Init
    materialises one layer at a time, which the estimator's largest-layer term already covers."""
    gpus = num_gpus_per_node * num_nodes
    out: dict[str, dict[str, int]] = {}
    cpu, gpu = estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node, num_nodes, cpu_offload=False)
    out["zero2"] = {
        "estimator_gpu": gpu,
        "estimator_cpu": cpu,
        "frozen_gpu": 2 * frozen,
        "frozen_cpu": 2 * frozen * num_gpus_per_node,
    }
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        trainable,
        largest_layer,
        num_gpus_per_node,
        num_nodes,
        cpu_offload=False,
        cpu_offload_params=False,
        zero_init=True,
    )
    out["zero3"] = {
        "estimator_gpu": gpu,
        "estimator_cpu": cpu,
        "frozen_gpu": math.ceil(2 * frozen / gpus),
        "frozen_cpu": 0,
    }
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        trainable,
        largest_layer,
        num_gpus_per_node,
        num_nodes,
        cpu_offload=True,
        cpu_offload_params=True,
        zero_init=True,
    )
    out["zero3_offload"] = {
        "estimator_gpu": gpu,
        "estimator_cpu": cpu,
        "frozen_gpu": 0,
        "frozen_cpu": math.ceil(2 * frozen / num_nodes),
    }
    for v in out.values():
        v["gpu"] = v["estimator_gpu"] + v["frozen_gpu"]
        v["cpu"] = v["estimator_cpu"] + v["frozen_cpu"]
    return out


# ---------------------------------------------------------------------------------------------- activations


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def image_tokens(rm: RecipeModel) -> int:
    """Image tokens per image in the language model: Qwen2.5-VL merges 2 x 2 patches of 14 px
    ((448 / 14)^2 / 4 = 256); LLaVA-1.5 keeps every CLIP patch but the CLS token ((336 / 14)^2 = 576)."""
    size = rm.cfg.model.mllm_image_size
    if rm.family == "qwen2_5_vl":
        v = QWEN2_5_VL_7B_INSTRUCT["vision_config"]
        return (size // v["patch_size"]) ** 2 // v["spatial_merge_size"] ** 2
    return (size // LLAVA_1_5_7B_HF["vision_config"]["patch_size"]) ** 2


def sample_tokens(
    processor, cfg: Config, *, expression: str, category: str, box: torch.Tensor
) -> dict[str, dict[str, int]]:
    """Per stage, the tokens of one training sample as :func:`ppcr.model.inputs.encode_stage` builds
    them: ``image`` tokens (expanded by the processor), ``text`` tokens (chat-templated prompt and
    answer, without the image tokens) and ``answer`` tokens (the labelled ones, where the LM head runs)."""
    texts = render_prompts(cfg.model.templates, expression, category, box, cfg.model.box_bins)
    size = cfg.model.mllm_image_size
    image = torch.zeros(3, size, size, dtype=torch.uint8)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(processor.image_token)
    out = {}
    for stage in ("semantic", "spatial"):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": texts[f"{stage}_prompt"]}]}]
        prompt = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        ids = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"][0]
        answer = len(tok(texts[f"{stage}_answer"], add_special_tokens=False)["input_ids"])
        n_image = int((ids == image_id).sum())
        out[stage] = {"image": n_image, "text": len(ids) - n_image + answer, "answer": answer}
    return out


def stage_tokens(rm: RecipeModel) -> dict[str, dict[str, int]]:
    """Per stage: prompt and answer tokens of the recipe's templates with a typical expression and box
    (:func:`sample_tokens`), through the family's processor and the tiny tokenizer as a proxy for the
    real one; ``length`` = image tokens + text tokens rounded up to a multiple of TEXT_ROUND.
    The tiny byte-level BPE splits words outside its synthetic vocabulary into several pieces, which
    over-counts and covers the real chat templates' extras (e.g. Qwen's default system prompt)."""
    counts = sample_tokens(
        rm.processor, rm.cfg, expression=TYPICAL_EXPRESSION, category=TYPICAL_CATEGORY, box=torch.tensor(TYPICAL_BOX)
    )
    return {
        stage: {"image": c["image"], "text": c["text"], "length": c["image"] + _round_up(c["text"], TEXT_ROUND)}
        for stage, c in counts.items()
    }


@dataclass(frozen=True)
class ActivationShapes:
    """Everything the activation formulas need, read off a built model by :func:`activation_shapes`."""

    micro_batch: int  # b
    lengths: tuple[int, ...]  # tokens per stage (semantic, spatial)
    image_tokens: int  # per image, in the language model
    hidden: int  # h
    layers: int  # L
    heads: int  # a
    vocab: int  # V
    fused_attention: bool  # SDPA / flash: no (a, s, s) score tensor is kept
    gradient_checkpointing: bool
    lora_in_features: int  # sum of the input widths of one layer's LoRA'd projections
    lora_modules: int  # LoRA'd projections per layer
    lora_rank: int
    vision_patches: int  # tokens in the vision tower per image
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    sam_tokens: int  # n = (1024 / 16)^2 for the released SAM
    sam_dim: int
    sam_heads: int  # of a global-attention block
    sam_mlp: int
    sam_out_chans: int
    sam_image_size: int


def activation_bytes(x: ActivationShapes) -> dict[str, object]:
    """Activation bytes per GPU for one micro batch, in 16-bit; ``held`` live until backward,
    ``transient`` at different moments, ``peak`` = sum(held) + max(transient).

    - Both stages' graphs live until the one backward. Language model (h hidden, L layers, a heads,
      s tokens, b micro batch): with gradient checkpointing each layer keeps its input (2sbh bytes)
      and backward recomputes one layer at a time; without, every layer keeps its activations. One
      layer's are Korthikanti et al. 2022's sbh(34 + 5as/h) bytes, without 5as/h when attention is
      fused (SDPA, transformers' default), plus per LoRA'd projection its dropped-out input and
      dropout mask (3 bytes per input element) and lora_A's output (2sbr). 34 is for GPT's 4h MLP;
      SwiGLU's is wider: a small under-count, on the one recomputed layer.
    - Logits over the whole sequence (losses.text_ce): cross-entropy keeps its fp32 log-probabilities
      (4bsV per stage); while a stage's loss is computed, its 16-bit logits, their copy with the
      new-token rows and the fp32 copy (8bsV) exist besides.
    - The frozen vision tower and SAM image encoder run without a graph: their outputs stay, their
      peak is one block. SAM ViT-H's global attention is eager: three (b, heads, n, n) score tensors
      exist at once while the decomposed relative positions are added; qkv, MLP and two copies of
      the hidden state on top. The vision tower's block: 4 hidden and 4 MLP-width copies (and the
      scores when not fused).
    - SAM's mask decoder (trained), a generous allowance: 32 copies of the (256, 64, 64) image
      embedding and 8 fp32 maps at SAM's input resolution (upsampled logits, losses) per image."""
    b, h = x.micro_batch, x.hidden

    def layer(s: int) -> int:
        scores = 0 if x.fused_attention else 5 * x.heads * s * s * b
        return 34 * s * b * h + scores + 3 * s * b * x.lora_in_features + 2 * s * b * x.lora_rank * x.lora_modules

    held: dict[str, int] = {}
    transient: dict[str, int] = {}
    if x.gradient_checkpointing:
        held["lm_layer_inputs"] = sum(2 * s * b * h * x.layers for s in x.lengths)
        transient["lm_layer_recompute"] = max(layer(s) for s in x.lengths)
    else:
        held["lm_layers"] = sum(layer(s) * x.layers for s in x.lengths)
    held["logits_fp32_logprobs"] = sum(4 * b * s * x.vocab for s in x.lengths)
    transient["logits_forward"] = max(8 * b * s * x.vocab for s in x.lengths)
    held["image_features"] = 2 * b * x.image_tokens * h
    n = x.vision_patches
    transient["vision_tower_block"] = 2 * b * n * (4 * x.vision_hidden + 4 * x.vision_intermediate) + (
        0 if x.fused_attention else 2 * b * x.vision_heads * n * n
    )
    n = x.sam_tokens
    transient["sam_encoder_global_block"] = 2 * b * (3 * x.sam_heads * n * n + n * (5 * x.sam_dim + 2 * x.sam_mlp))
    held["sam_embeddings"] = 2 * b * x.sam_out_chans * n
    held["sam_mask_decoder"] = b * (32 * 2 * x.sam_out_chans * n + 8 * 4 * x.sam_image_size**2)
    return {"held": held, "transient": transient, "peak": sum(held.values()) + max(transient.values())}


def activation_shapes(rm: RecipeModel, tokens: dict[str, dict[str, int]] | None = None) -> ActivationShapes:
    """The shapes of a recipe's model and micro batch (tokens per stage from :func:`stage_tokens`)."""
    tokens = tokens or stage_tokens(rm)
    cfg = rm.cfg
    base = rm.model.mllm.base_model.model
    text, vision = base.config.get_text_config(), base.config.vision_config
    lora = [m for m in rm.model.family.language_model.layers[0].modules() if isinstance(m, LoraLayer)]
    encoder = rm.model.sam.sam.image_encoder
    block = next(blk for blk in encoder.blocks if blk.window_size == 0)  # a global-attention block
    patch = encoder.patch_embed.proj.kernel_size[0]
    cls = 0 if rm.family == "qwen2_5_vl" else 1  # CLIP's class token
    return ActivationShapes(
        micro_batch=cfg.train.micro_batch_size,
        lengths=tuple(tokens[st]["length"] for st in ("semantic", "spatial")),
        image_tokens=tokens["semantic"]["image"],
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        heads=text.num_attention_heads,
        vocab=text.vocab_size,
        fused_attention=base.config._attn_implementation in ("sdpa", "flash_attention_2", "flash_attention_3"),
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        lora_in_features=sum(m.in_features for m in lora),
        lora_modules=len(lora),
        lora_rank=cfg.model.lora.rank,
        vision_patches=(cfg.model.mllm_image_size // vision.patch_size) ** 2 + cls,
        vision_hidden=vision.hidden_size,
        vision_intermediate=vision.intermediate_size,
        vision_heads=getattr(vision, "num_heads", None) or vision.num_attention_heads,
        sam_tokens=(encoder.img_size // patch) ** 2,
        sam_dim=encoder.patch_embed.proj.out_channels,
        sam_heads=block.attn.num_heads,
        sam_mlp=block.mlp.lin1.out_features,
        sam_out_chans=encoder.neck[0].out_channels,
        sam_image_size=encoder.img_size,
    )


def activation_memory(rm: RecipeModel) -> dict[str, object]:
    """:func:`activation_bytes` of the recipe, with its tokens per stage and micro batch."""
    tokens = stage_tokens(rm)
    return {
        "tokens": tokens,
        "micro_batch": rm.cfg.train.micro_batch_size,
        **activation_bytes(activation_shapes(rm, tokens)),
    }


# ---------------------------------------------------------------------------------------------- checkpoints

DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
# What ZeRO's optimizer saves per trained parameter, partitioned over the ranks (its *_optim_states.pt
# files): the fp32 master weight and Adam's two fp32 moments, in ZeRO-2 and ZeRO-3 alike.
OPTIMIZER_CHECKPOINT_BYTES = 4 + 8


def checkpoint_bytes(
    trainable: int,
    frozen: int,
    num_gpus: int,
    stage: str,
    param_bytes: int,
    buffer_bytes: int = 0,
    frozen_included: bool = False,
) -> dict[str, int]:
    """Bytes of one checkpoint as :func:`ppcr.train.checkpoint.save` writes it: ``total`` over all
    files and ``rank``, the largest one rank writes, for ``stage`` in STAGES on ``num_gpus`` ranks.

    Every rank writes its partition of the optimizer (OPTIMIZER_CHECKPOINT_BYTES per trained
    parameter, 1/N each). The module state (*_model_states.pt) holds the persistent buffers and,
    under ZeRO-2, written by rank 0 alone, the trained weights in the parameter dtype; under ZeRO-3
    every rank writes one, with size-0 placeholders for the weights. ``frozen_included`` is what
    DeepSpeed saves without exclude_frozen_parameters (ppcr before): the frozen weights in the
    parameter dtype besides, whole on rank 0 under ZeRO-2 (the frozen fragments share their storage
    with the module state, so torch.save writes them once), 1/N per rank under ZeRO-3. DeepSpeed's
    padding and pickled metadata (kilobytes) are left out."""
    optimizer = math.ceil(OPTIMIZER_CHECKPOINT_BYTES * trainable / num_gpus)
    if stage == "zero2":
        module = param_bytes * (trainable + (frozen if frozen_included else 0)) + buffer_bytes
        return {"total": num_gpus * optimizer + module, "rank": optimizer + module}
    module = buffer_bytes + (math.ceil(param_bytes * frozen / num_gpus) if frozen_included else 0)
    return {"total": num_gpus * (optimizer + module), "rank": optimizer + module}


def eval_model_bytes(trainable: int, frozen: int, param_bytes: int, consolidate_frozen: bool = False) -> int:
    """Host memory of :func:`ppcr.model.saving.load_checkpoint` on an eval rank, at its peak: the model
    built from the base paths in the recipe's dtype, and the trainable parameters consolidated in
    fp32 by zero_to_fp32 beside it. ``consolidate_frozen``: ppcr before, which consolidated every
    parameter in fp32 (a lower bound: zero_to_fp32 also holds the frozen fragments it read)."""
    return param_bytes * (trainable + frozen) + 4 * (trainable + (frozen if consolidate_frozen else 0))


# ---------------------------------------------------------------------------------------------- the table


def memory_table(models: list[RecipeModel] | None = None, allowance_gib: float = ALLOWANCE_GIB) -> list[dict]:
    """Rows of recipe x {ZeRO-2, ZeRO-3, ZeRO-3 + offload} x {8x24GB, 8x80GB}: model states + activations
    + ``allowance_gib`` per GPU (GiB, to 0.1), per-node CPU (GiB) and whether it fits the GPU; one
    checkpoint's size, in all and on the rank that writes most (GiB, to 0.01), and with the frozen
    weights included as before; the memory of the model loaded from a checkpoint on an eval rank,
    and as before (GiB, to 0.1). ``models`` defaults to both real recipes."""
    rows = []
    for rm in models if models is not None else [build_meta_model(name) for name in RECIPES]:
        name = rm.name
        acts = activation_memory(rm)
        pbytes = DTYPE_BYTES[rm.cfg.model.dtype]
        evals = {
            k: eval_model_bytes(rm.trainable, rm.frozen, pbytes, consolidate_frozen=k == "before")
            for k in ("now", "before")
        }
        for setup, (gpus, capacity) in GPU_SETUPS.items():
            states = model_state_memory(rm.trainable, rm.frozen, rm.largest_layer, num_gpus_per_node=gpus)
            for stage in STAGES:
                s = states[stage]
                ckpt, before = (
                    checkpoint_bytes(rm.trainable, rm.frozen, gpus, stage, pbytes, rm.buffer_bytes, frozen_included=f)
                    for f in (False, True)
                )
                per_gpu = (s["gpu"] + acts["peak"]) / GIB + allowance_gib
                rows.append(
                    {
                        "recipe": name,
                        "zero": STAGE_NAMES[stage],
                        "gpus": setup,
                        "estimator_gpu_gib": round(s["estimator_gpu"] / GIB, 1),
                        "frozen_gpu_gib": round(s["frozen_gpu"] / GIB, 1),
                        "activations_gib": round(acts["peak"] / GIB, 1),
                        "allowance_gib": allowance_gib,
                        "per_gpu_gib": round(per_gpu, 1),
                        "capacity_gib": capacity,
                        "estimator_cpu_gib": round(s["estimator_cpu"] / GIB, 1),
                        "frozen_cpu_gib": round(s["frozen_cpu"] / GIB, 1),
                        "cpu_per_node_gib": round(s["cpu"] / GIB, 1),
                        "fits": per_gpu <= capacity,
                        "checkpoint_gib": round(ckpt["total"] / GIB, 2),
                        "checkpoint_rank_gib": round(ckpt["rank"] / GIB, 2),
                        "checkpoint_with_frozen_gib": round(before["total"] / GIB, 2),
                        "checkpoint_with_frozen_rank_gib": round(before["rank"] / GIB, 2),
                        "eval_model_gib": round(evals["now"] / GIB, 1),
                        "eval_model_before_gib": round(evals["before"] / GIB, 1),
                    }
                )
    return rows


def render_markdown(rows: list[dict]) -> str:
    """The table as Markdown; GiB throughout. The checkpoint columns read "all files (largest rank)";
    "before" is with the frozen weights saved and consolidated, as ppcr did before."""
    head = [
        "recipe",
        "ZeRO",
        "GPUs",
        "estimator GPU",
        "frozen 16-bit GPU",
        "activations",
        "allowance",
        "per GPU",
        "estimator CPU",
        "frozen 16-bit CPU",
        "CPU per node",
        "fits",
        "checkpoint (largest rank)",
        "checkpoint before",
        "eval rank model (before)",
    ]
    keys = [
        "recipe",
        "zero",
        "gpus",
        "estimator_gpu_gib",
        "frozen_gpu_gib",
        "activations_gib",
        "allowance_gib",
        "per_gpu_gib",
        "estimator_cpu_gib",
        "frozen_cpu_gib",
        "cpu_per_node_gib",
        "fits",
    ]
    return table(
        head,
        [
            [
                ("yes" if r[k] else "no") if k == "fits" else (f"{r[k]:.1f}" if isinstance(r[k], float) else str(r[k]))
                for k in keys
            ]
            + [
                f"{r['checkpoint_gib']:.2f} ({r['checkpoint_rank_gib']:.2f})",
                f"{r['checkpoint_with_frozen_gib']:.2f} ({r['checkpoint_with_frozen_rank_gib']:.2f})",
                f"{r['eval_model_gib']:.1f} ({r['eval_model_before_gib']:.1f})",
            ]
            for r in rows
        ],
    )


# ---------------------------------------------------------------------------------------------- in small

# Bytes per parameter element that ZeRO-3 allocates (tests/test_memory.py measures them): parameter
# partitions and gradient partitions in the parameter dtype, an fp32 master partition (a copy even in
# fp32: stage3.py's "no copy" branch compares torch.device with a str, which is never equal), and
# Adam's two fp32 moments: 20 bytes per trained parameter in fp32, 16 in bf16. The ZeRO-3 estimator
# charges 18, read here as 2 (16-bit parameter) + 4 (fp32 gradient) + 4 (master) + 8 (Adam).
ESTIMATOR_BYTES = {"param": 2, "grad": 4, "master": 4, "adam": 8}
ZERO3_BYTES = {
    "fp32": {"param": 4, "grad": 4, "master": 4, "adam": 8},
    "bf16": {"param": 2, "grad": 2, "master": 4, "adam": 8},
}


def expected_zero3_bytes_per_rank(
    n_trainable: int, n_frozen: int, world_size: int, precision: str = "fp32"
) -> dict[str, float]:
    """What DeepSpeed's ZeRO-3 estimator predicts per rank for ``params``, ``gradients``, ``optimizer``
    and ``total``, mapped to ``precision``: the estimator's per-GPU figure for the trainable
    parameters (``estimator``; no largest-layer term: gathered layers are freed after use) plus, per
    trainable parameter, the difference between ZERO3_BYTES and ESTIMATOR_BYTES (fp32: the parameter
    is 4 bytes, not 2), plus the frozen parameters' partitions. Everything scales as 1/world_size,
    which is what measured memory at 1 and 2 ranks is checked against; DeepSpeed pads each
    parameter's partition to a whole element (< 1 element per tensor and rank) and keeps one 4-byte
    Adam step per parameter group, both left out here."""
    b = ZERO3_BYTES[precision]
    _, estimator, _ = estimate_zero3_model_states_mem_needs(
        n_trainable, 0, world_size, 1, cpu_offload=False, cpu_offload_params=False, zero_init=True
    )
    extra = (sum(b.values()) - sum(ESTIMATOR_BYTES.values())) * n_trainable / world_size
    out = {
        "params": b["param"] * (n_trainable + n_frozen) / world_size,
        "gradients": b["grad"] * n_trainable / world_size,
        "optimizer": (b["master"] + b["adam"]) * n_trainable / world_size,
    }
    out["total"] = estimator + extra + b["param"] * n_frozen / world_size
    out["estimator"] = estimator
    if not math.isclose(out["total"], out["params"] + out["gradients"] + out["optimizer"], abs_tol=1.0):
        raise AssertionError("the byte table and DeepSpeed's estimator disagree")  # estimator changed
    return out


def zero3_scaling_rows(
    measured: dict[int, dict[str, int]], n_trainable: int, n_frozen: int, precision: str = "fp32"
) -> list[dict]:
    """Measured (``model_state_bytes`` after the first step, per world size) beside expected, for
    params, gradients, optimizer and total, with each one's share of its 1-rank value."""
    rows = []
    for world in sorted(measured):
        expected = expected_zero3_bytes_per_rank(n_trainable, n_frozen, world, precision)
        for key in ("params", "gradients", "optimizer", "total"):
            rows.append(
                {
                    "world_size": world,
                    "state": key,
                    "measured": measured[world][key],
                    "expected": round(expected[key]),
                    "measured_vs_1_rank": measured[world][key] / measured[min(measured)][key],
                    "expected_vs_1_rank": min(measured) / world,
                }
            )
    return rows
