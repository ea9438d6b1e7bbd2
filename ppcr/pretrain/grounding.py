"""Pretraining the tiny MLLM's language model on grounding, the way real MLLMs are trained on boxes.

Two kinds of question per synthetic scene, answered in the box text PPCR's recipes use
("<box>(x1,y1),(x2,y2)</box>", ``model.box_bins`` per side):

- dense grounding: "List every object and its box." -> every object's size, colour, shape and box,
  left to right;
- grounding questions: 'Where is "the red circle"?' -> its box, for the expressions that name an object
  by its attributes alone (difficulty level 0 of the generator). Size, position and relations are
  left to PPCR's own training.

The vision tower keeps its pretrained weights; the projector and the language model learn.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from ppcr.model.generation import decode
from ppcr.model.inputs import StageInputs, encode_stage, scatter_image_features
from ppcr.model.losses import text_ce
from ppcr.model.mllm import Family
from ppcr.model.tokens import BOX_CLOSE, box_text, parse_box_text
from ppcr.pretrain.scenes import PretrainScene

LIST_PROMPT = "List every object and its box."
WHERE_PROMPT = 'Where is "{expression}"? Answer with its box.'


def norm_box(scene: PretrainScene, k: int) -> list[float]:
    """Object k's visible box as normalised (cx, cy, w, h)."""
    h, w = scene.image.shape[-2:]
    x0, y0, x1, y1 = scene.objects[k].box
    return [(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h]


def grounding_examples(scene: PretrainScene, bins: int) -> list[tuple[str, str, list[float] | None]]:
    """(prompt, answer, box of a grounding question's target) pairs of one scene: the dense listing
    and one grounding question (when the scene has a level-0 expression), chosen by the scene index."""
    rng = random.Random(scene.index)
    order = sorted(range(len(scene.objects)), key=lambda k: norm_box(scene, k)[0])
    listing = " ".join(f"{scene.objects[k].name} {box_text(norm_box(scene, k), bins)}" for k in order)
    out: list[tuple[str, str, list[float] | None]] = [(LIST_PROMPT, listing, None)]
    questions = [(k, e) for k, levels in scene.expressions.items() for e in levels.get(0, [])]
    if questions:
        k, expression = rng.choice(questions)
        box = norm_box(scene, k)
        out.append((WHERE_PROMPT.format(expression=expression), box_text(box, bins), box))
    return out


def language_model_hidden(
    mllm: nn.Module, family: Family, image_token_id: int, stage: StageInputs, features: torch.Tensor
) -> torch.Tensor:
    """(B, L, H) last-layer states of the bare MLLM on a stage batch, image features at the image tokens."""
    e = scatter_image_features(mllm.get_input_embeddings()(stage.input_ids), stage.input_ids, image_token_id, features)
    return family.language_model(
        inputs_embeds=e, attention_mask=stage.attention_mask, position_ids=stage.positions, use_cache=False
    ).last_hidden_state


def grounding_loss(
    mllm: nn.Module, processor, family: Family, image_token_id: int, examples: list[tuple[torch.Tensor, str, str]]
) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on the answers of (image, prompt, answer) examples."""
    images, prompts, answers = zip(*examples)
    stage, vision = encode_stage(processor, family, image_token_id, list(prompts), list(answers), list(images))
    hidden = language_model_hidden(mllm, family, image_token_id, stage, family.image_features(vision))
    ce = text_ce(hidden, stage, mllm.get_output_embeddings())
    return ce, {"ce": ce.detach()}


@torch.no_grad()
def grounding_box(
    mllm: nn.Module,
    processor,
    family: Family,
    image_token_id: int,
    image: torch.Tensor,
    prompt: str,
    bins: int,
    max_new_tokens: int = 24,
) -> torch.Tensor | None:
    """Greedy answer to one grounding question, parsed as a normalised (cx, cy, w, h) box."""
    stage, vision = encode_stage(processor, family, image_token_id, [prompt], None, [image])
    e = scatter_image_features(
        mllm.get_input_embeddings()(stage.input_ids), stage.input_ids, image_token_id, family.image_features(vision)
    )
    stop = processor.tokenizer.convert_tokens_to_ids(BOX_CLOSE)
    out = decode(
        family,
        e,
        stage,
        embed=mllm.get_input_embeddings(),
        logits=mllm.get_output_embeddings(),
        stops=(stop,),
        max_new_tokens=max_new_tokens,
    )
    return parse_box_text(processor.tokenizer.decode(out.ids[0]), bins)
