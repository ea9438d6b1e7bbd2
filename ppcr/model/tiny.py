"""Tiny random-initialised backbones of the real classes, saved to disk like a downloaded checkpoint.

Tests and the CPU default use these: a Qwen2.5-VL and a LLaVA-1.5 style MLLM (transformers classes,
a byte-level BPE tokenizer trained offline on the synthetic vocabulary, a processor built directly,
a chat template of the real model's shape that renders a turn's content in order), and a SAM of
segment_anything's own classes. They are written with ``save_pretrained`` / ``torch.save`` and loaded
back through exactly the path a real checkpoint takes, so nothing in ppcr knows that they are tiny.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from ppcr.config import SamArchConfig, TinyMllmConfig
from ppcr.data import synthetic
from ppcr.model.sam import build_sam, save_sam_state
from ppcr.model.tokens import BOX_CLOSE, BOX_OPEN

FAMILIES = ("qwen2_5_vl", "llava")

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LLAVA_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _corpus() -> list[str]:
    """Text the tiny tokenizer learns its merges from: the synthetic vocabulary, prompts, digits."""
    words = [c[1] for c in synthetic.CATEGORIES] + list(synthetic.COLOURS) + list(synthetic.SIZES)
    words += [
        "the",
        "left",
        "right",
        "of",
        "above",
        "below",
        "on",
        "at",
        "top",
        "bottom",
        "leftmost",
        "rightmost",
        "is",
        "it",
        "where",
        "what",
        "in",
        "this",
        "image",
        "object",
        "refers",
        "to",
        "box",
        "answer",
        "with",
        "its",
        "find",
        "please",
        "segment",
        "and",
        "a",
        "locate",
        "user",
        "assistant",
        "system",
    ]
    lines = [" ".join(words)] * 20 + [" ".join(str(d) for d in range(10))] * 20 + ["(0,0),(999,999)"] * 20
    return lines


def build_tokenizer(special: list[str], family: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE (like Qwen2's and Llama's) with digits split one by one, trained offline. The box
    text's delimiters are tokens of their own, as Qwen2-VL's <|box_start|> / <|box_end|> are."""
    special = special + [BOX_OPEN, BOX_CLOSE]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    if family == "llava":
        kw = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        kw["extra_special_tokens"] = {"image_token": "<image>"}
    else:
        kw = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
        kw["extra_special_tokens"] = {
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        }
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=2048, padding_side="right", **kw)


def build_tiny_mllm(
    family: str, out: str | Path, image_size: int = 112, arch: TinyMllmConfig | None = None, seed: int = 0
) -> Path:
    """Write a tiny random-initialised MLLM of ``family`` (model, tokenizer, processor) to ``out``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family '{family}' (choose from {', '.join(FAMILIES)})")
    a = arch or TinyMllmConfig()
    torch.manual_seed(seed)
    out = Path(out)
    text = dict(
        hidden_size=a.hidden,
        intermediate_size=2 * a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=2048,
    )
    if family == "qwen2_5_vl":
        tokenizer = build_tokenizer(QWEN_SPECIAL, family)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
        config = Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=len(tokenizer),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                tie_word_embeddings=False,
                bos_token_id=None,
                eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"],
                **text,
            ),
            vision_config=dict(
                depth=a.vision_depth,
                hidden_size=a.vision_hidden,
                intermediate_size=a.vision_mlp_ratio * a.vision_hidden,
                num_heads=a.vision_heads,
                patch_size=a.patch_size,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=4 * a.patch_size,
                out_hidden_size=a.hidden,
                fullatt_block_indexes=list(range(1, a.vision_depth, 2)),
            ),
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=False,
        )
        model = Qwen2_5_VLForConditionalGeneration(config)
    else:
        tokenizer = build_tokenizer(LLAVA_SPECIAL, family)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL}
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=a.vision_hidden,
                intermediate_size=a.vision_mlp_ratio * a.vision_hidden,
                num_hidden_layers=a.vision_depth,
                num_attention_heads=a.vision_heads,
                image_size=image_size,
                patch_size=a.patch_size,
                projection_dim=a.vision_hidden,
            ),
            text_config=LlamaConfig(
                vocab_size=len(tokenizer),
                bos_token_id=ids["<s>"],
                eos_token_id=ids["</s>"],
                pad_token_id=ids["<pad>"],
                **text,
            ),
            image_token_index=ids["<image>"],
            image_seq_length=(image_size // a.patch_size) ** 2,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",  # every tiny layer counts
        )
        model = LlavaForConditionalGeneration(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_processor(family, image_size, tokenizer, patch_size=a.patch_size).save_pretrained(out)
    return out


def build_processor(
    family: str,
    image_size: int,
    tokenizer: PreTrainedTokenizerFast,
    patch_size: int,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
):
    """The family's processor for square ``image_size`` images, with a chat template of the real model's
    shape (Qwen: ``merge_size`` x ``merge_size`` patches per image token; LLaVA: CLIP with its CLS token)."""
    if family == "qwen2_5_vl":
        sizes = dict(
            min_pixels=image_size**2,
            max_pixels=image_size**2,
            patch_size=patch_size,
            merge_size=merge_size,
            temporal_patch_size=temporal_patch_size,
        )
        return Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(**sizes),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(**sizes),
            chat_template=QWEN_CHAT_TEMPLATE,
        )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def save_tiny_sam(arch: SamArchConfig, image_size: int, path: str | Path, seed: int = 0) -> Path:
    """A tiny SAM checkpoint: a plain state_dict, as Meta's sam_vit_*.pth files are."""
    torch.manual_seed(seed)
    return save_sam_state(build_sam(arch, image_size).state_dict(), path)


def main(argv: list[str] | None = None) -> int:
    from ppcr.config import ConfigError, load_config

    p = argparse.ArgumentParser(
        prog="ppcr-tiny",
        description="Write the tiny random-initialised MLLM and SAM "
        "named by a recipe's model.mllm_path and model.sam_checkpoint, if missing.",
    )
    p.add_argument("--config", help="recipe YAML")
    p.add_argument("--force", action="store_true", help="rewrite even if present")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = cfg.model
    if m.tiny_family is None:
        print("error: model.tiny_family is not set: this recipe loads a real checkpoint", file=sys.stderr)
        return 2
    if args.force or not (Path(m.mllm_path) / "config.json").is_file():
        build_tiny_mllm(m.tiny_family, m.mllm_path, image_size=m.mllm_image_size, arch=m.tiny_mllm, seed=cfg.train.seed)
        print(f"wrote tiny {m.tiny_family} to {m.mllm_path}")
    if m.sam_type == "tiny" and (args.force or not Path(m.sam_checkpoint).is_file()):
        save_tiny_sam(m.sam_arch, m.sam_image_size, m.sam_checkpoint, seed=cfg.train.seed)
        print(f"wrote tiny SAM to {m.sam_checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
