"""Batched greedy decoding of one PPCR stage, apart from the training step.

A stage's answer holds a marker token ([SEM] or [LOC]) whose last-layer hidden state is the stage's
prompt, and ends at a stop token (the marker itself, or the end of a box text written after it).
The marker's hidden state is the one computed with the marker as *input*, as in teacher forcing, so
when the marker is generated it is fed back once.

Prompts are left-padded (:func:`ppcr.model.inputs.encode_stage` with no answers), so that every row's
next token sits in the last column; positions come from the attention mask (M-RoPE included), and
each step appends one column to the mask. A row that is done keeps being fed its own argmax, which
is discarded: rows never attend to each other, so a row's answer does not depend on the batch.

transformers' ``generate`` does not fit: PPCR builds the input embeddings itself (image features at
the image tokens, SemSP at its placeholder, the trained rows of the new tokens, which live beside the
frozen embedding matrix), passes explicit M-RoPE positions, and needs the hidden state of one chosen
generated token per row, not only the ids.

Under ZeRO-3 every forward gathers parameters collectively, so ranks must run the same number of
forwards: ``agree`` is called once per step, before the forward, with whether this rank is done,
and returns whether every rank is (an all-reduce, as transformers' ``synced_gpus``); a rank that is
done keeps decoding, and discards what it decodes, until all are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Agree = Callable[[bool], bool]


@dataclass
class Decoded:
    ids: list[list[int]]  # per row: generated ids up to and including the stop token
    marker_hidden: torch.Tensor  # (B, H): at the marker, or at the row's last fed token when it never came
    found: list[bool]  # per row: whether the marker was generated
    forwards: int  # language-model forwards run (prefill included)
    prompt_hidden: torch.Tensor  # (B, L, H) the prefill's last-layer states (the box head reads the image tokens')


@torch.no_grad()
def decode(
    family,
    embeds: torch.Tensor,
    stage,
    *,
    embed: Callable,
    logits: Callable,
    stops: tuple[int, ...],
    max_new_tokens: int,
    marker: int | None = None,
    agree: Agree | None = None,
) -> Decoded:
    """Greedy decoding of a batch of left-padded prompts, embeddings (B, L, H), until each row has
    generated a token of ``stops`` (and, when that token is ``marker``, fed it back once); ``embed``
    maps ids (B, 1) to input embeddings and ``logits`` hidden states (B, H) to logits (B, V)."""
    lm = family.language_model
    mask, pos = stage.attention_mask, stage.positions
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
    cache, prompt_hidden = out.cache, out.last_hidden_state
    hidden = prompt_hidden[:, -1]  # (B, H)
    forwards, rows = 1, embeds.shape[0]
    ids: list[list[int]] = [[] for _ in range(rows)]
    last = hidden.clone()  # per row: the hidden state at its last fed token, or at its marker
    found, done = [False] * rows, [False] * rows
    for _ in range(max_new_tokens):
        tokens = logits(hidden).argmax(-1)  # (B,)
        pending = [False] * rows  # rows whose marker was just generated: its hidden state is the next forward's
        for i, token in enumerate(tokens.tolist()):
            if not done[i]:
                ids[i].append(token)
                done[i] = token in stops
                pending[i] = token == marker
        finished = all(done) and not any(pending)
        if agree(finished) if agree is not None else finished:
            break
        # rows whose fed token's hidden state is kept: the marker, or the latest token while no marker came
        fed = [not f and (not d or p) for f, d, p in zip(found, done, pending)]
        pos = family.next_position(pos)
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        out = lm(
            inputs_embeds=embed(tokens[:, None]), attention_mask=mask, position_ids=pos, cache=cache, use_cache=True
        )
        cache, hidden = out.cache, out.last_hidden_state[:, -1]
        forwards += 1
        keep = torch.tensor(fed, device=hidden.device)[:, None]
        last = torch.where(keep, hidden, last)
        found = [f or p for f, p in zip(found, pending)]
    return Decoded(ids, last, found, forwards, prompt_hidden)


def greedy_stage(
    model,
    stage,
    features: torch.Tensor,
    semsp_embed: torch.Tensor | None,
    *,
    marker: int,
    stops: tuple[int, ...],
    max_new_tokens: int,
    agree: Agree | None = None,
) -> Decoded:
    """Decode one PPCR stage (``stage`` holds left-padded prompts) of ``model`` (a PPCRModel). The tokenizer's end
    of sequence ends a row too: a model that ends its answer without the stage's token has answered."""
    eos = model.tokenizer.eos_token_id
    stops = tuple(stops) + ((eos,) if eos is not None and eos not in stops else ())
    return decode(
        model.family,
        model.embed(stage, features, semsp_embed),
        stage,
        embed=model.token_rows,
        logits=model.token_rows.logits,
        stops=stops,
        max_new_tokens=max_new_tokens,
        marker=marker,
        agree=agree,
    )
