"""One stage's token batch: the chat-templated prompt with its image tokens, the answer and its labels.

Shared by PPCR's two stages and by the tiny MLLM's pretraining, so that both tokenise alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppcr.model.mllm import Family


@dataclass
class StageInputs:
    """One stage's token batch: right-padded with answers (training), left-padded without (generation,
    so that every row's next token is in the last column); ``labels`` is -100 outside the answers."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    positions: torch.Tensor  # (B, L) or (3, B, L)
    image_tokens: int  # image tokens in the batch, counted on the host
    tokens: int  # tokens the language model attends to (attention mask), counted on the host
    labels: torch.Tensor | None = None
    marker: torch.Tensor | None = None  # (B,) position of each answer's [SEM] / [LOC], found on the host
    # The N labelled tokens, found on the host: flat (B * L) index of the position that predicts each,
    # and its id. The LM head runs at these positions only (under 10 % of a stage's tokens).
    target_index: torch.Tensor | None = None  # (N,)
    targets: torch.Tensor | None = None  # (N,)
    # Where each row's T image tokens sit (found on the host; every row holds one image of the same grid)
    image_positions: torch.Tensor | None = None  # (B, T)
    token_grid: tuple[int, int] | None = None  # (rows, columns) of those T tokens, raster order

    def counts(self) -> dict[str, int]:
        """The batch's rows, attended tokens, image tokens and labelled tokens; no read from the device."""
        return {
            "rows": len(self.input_ids),
            "tokens": self.tokens,
            "image": self.image_tokens,
            "answer": 0 if self.target_index is None else len(self.target_index),
        }


def encode_stage(
    processor,
    family: Family,
    image_token_id: int,
    prompts: list[str],
    answers: list[str] | None,
    images: list[torch.Tensor],
    *,
    marker: int | None = None,
    query_first: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[StageInputs, dict]:
    """Chat-template the prompts and expand their image tokens (one call of the MLLM's processor for
    the batch), append the answer tokens with labels and pad right; without answers, pad left. The user
    turn holds the image, then the prompt, or the prompt first with ``query_first`` (model.query_first).
    Positions, the image-token count and positions, and the position of ``marker`` in each answer are
    worked out here on the host, so that the device work needs no synchronisation. Returns the stage
    inputs and the processor's image inputs, both on ``device``."""
    tokenizer = processor.tokenizer
    content = [[{"type": "image"}, {"type": "text", "text": p}] for p in prompts]
    conv = [[{"role": "user", "content": c[::-1] if query_first else c}] for c in content]
    texts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conv]
    enc = processor(text=texts, images=list(images), return_tensors="pt", padding=True)
    keys = family.text_keys()
    keep = enc["attention_mask"].bool()  # the prompt's tokens, whichever side the processor padded
    prompt_ids = [enc["input_ids"][i][keep[i]] for i in range(len(texts))]
    answer_ids = (
        tokenizer(answers, add_special_tokens=False)["input_ids"] if answers is not None else [[] for _ in texts]
    )
    b, length = len(texts), max(len(p) + len(a) for p, a in zip(prompt_ids, answer_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((b, length), pad, dtype=torch.long)
    attention = torch.zeros((b, length), dtype=torch.long)
    labels = torch.full((b, length), -100, dtype=torch.long)
    text_extra = {k: torch.zeros((b, length), dtype=torch.long) for k in keys}
    for i, (ids, answer) in enumerate(zip(prompt_ids, answer_ids)):
        n, m = len(ids), len(answer)
        at = 0 if answers is not None else length - n  # where the row starts
        input_ids[i, at : at + n] = ids
        input_ids[i, at + n : at + n + m] = torch.tensor(answer, dtype=torch.long)
        attention[i, at : at + n + m] = 1
        labels[i, at + n : at + n + m] = input_ids[i, at + n : at + n + m]
        for k in keys:
            text_extra[k][i, at : at + n] = enc[k][i][keep[i]]
    vision = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask") and k not in keys}
    positions = family.positions(input_ids, attention, vision, text_extra)
    where = None
    if marker is not None:
        hits = input_ids == marker
        if not bool((hits.sum(-1) == 1).all()):
            name = tokenizer.convert_ids_to_tokens(marker)
            raise ValueError(f"every answer must hold exactly one {name}; counts {hits.sum(-1).tolist()}")
        where = hits.int().argmax(-1)
    target_index = targets = None
    if answers is not None:
        predicts = torch.zeros_like(labels, dtype=torch.bool)
        predicts[:, :-1] = labels[:, 1:] != -100  # position p predicts the token at p + 1
        target_index = predicts.flatten().nonzero().squeeze(1)
        targets = labels[:, 1:][predicts[:, :-1]]
    is_image = input_ids == image_token_id
    per_row = is_image.sum(-1)
    image_positions = None
    if bool((per_row == per_row[0]).all()) and int(per_row[0]) > 0:
        image_positions = is_image.nonzero()[:, 1].view(b, -1)
    stage = StageInputs(
        input_ids.to(device),
        attention.to(device),
        positions.to(device),
        image_tokens=int((input_ids == image_token_id).sum()),
        tokens=int(attention.sum()),
        labels=labels.to(device) if answers is not None else None,
        marker=where.to(device) if where is not None else None,
        target_index=target_index.to(device) if target_index is not None else None,
        targets=targets.to(device) if targets is not None else None,
        image_positions=image_positions.to(device) if image_positions is not None else None,
        token_grid=family.token_grid(vision) if image_positions is not None else None,
    )
    return stage, {k: v.to(device) for k, v in vision.items()}


def scatter_image_features(
    embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, features: torch.Tensor
) -> torch.Tensor:
    """(B, L, H) input embeddings with the image features (N, H) put at the N image tokens, in order."""
    mask = (input_ids == image_token_id).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(mask, features.to(embeds.dtype))
