"""Greedy decoding of one PPCR stage, apart from the training step.

A stage's answer holds a marker token ([SEM] or [LOC]) whose last-layer hidden state is the stage's
prompt, and ends at a stop token (the marker itself, or the end of a box text written after it).
The marker's hidden state is the one computed with the marker as *input*, as in teacher forcing, so
when the marker is generated it is fed back once.

transformers' ``generate`` does not fit: PPCR builds the input embeddings itself (image features at
the image tokens, SemSP at its placeholder, the trained rows of the new tokens) and needs a hidden
state of one chosen generated token, not only the ids.

Under ZeRO-3 every forward gathers parameters collectively, so ranks must run the same number of
forwards: ``agree`` is called once per step with whether this rank is done and returns whether
every rank is (an all-reduce, as transformers' ``synced_gpus``); a rank that is done keeps
decoding, and discards what it decodes, until all are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Agree = Callable[[bool], bool]


@dataclass
class Decoded:
    ids: list[int]  # generated ids up to and including the stop token
    marker_hidden: torch.Tensor  # (1, H): at the marker, or at the last token when it never came
    found: bool  # whether the marker was generated


@torch.no_grad()
def decode(family, embeds: torch.Tensor, stage, *, embed: Callable, logits: Callable, stops: tuple[int, ...],
           max_new_tokens: int, marker: int | None = None, agree: Agree | None = None) -> Decoded:
    """Greedy decoding of one sequence from its prompt embeddings (1, L, H) until a token of ``stops``;
    ``embed`` maps ids to input embeddings and ``logits`` hidden states to logits."""
    lm = family.language_model
    out = lm(inputs_embeds=embeds, attention_mask=stage.attention_mask, position_ids=stage.positions, use_cache=True)
    cache, hidden, pos = out.cache, out.last_hidden_state[:, -1], stage.positions
    ids: list[int] = []
    marker_hidden: torch.Tensor | None = None
    done = False
    for _ in range(max_new_tokens):
        token = logits(hidden).argmax(-1)  # (1,)
        if not done:
            ids.append(int(token))
            done = ids[-1] in stops
            if done and (marker is None or ids[-1] != marker) and agree is None:
                break  # nothing more to compute: the stop token's own hidden state is not needed
        pos = family.next_position(pos)
        out = lm(inputs_embeds=embed(token[:, None]), position_ids=pos, cache=cache, use_cache=True)
        cache, hidden = out.cache, out.last_hidden_state[:, -1]
        if marker is not None and marker_hidden is None and ids[-1] == marker:
            marker_hidden = hidden
        if agree(done) if agree is not None else done:
            break
    found = marker_hidden is not None
    return Decoded(ids, marker_hidden if found else hidden, found)


def greedy_stage(model, stage, features: torch.Tensor, semsp_embed: torch.Tensor | None, *, marker: int,
                 stops: tuple[int, ...], max_new_tokens: int, agree: Agree | None = None) -> Decoded:
    """Decode one PPCR stage (``stage`` holds a single unpadded prompt) of ``model`` (a PPCRModel)."""
    return decode(model.family, model.embed(stage, features, semsp_embed), stage, embed=model.token_rows,
                  logits=model.token_rows.logits, stops=stops, max_new_tokens=max_new_tokens, marker=marker,
                  agree=agree)
