"""PPCR's special tokens, the box text, the two prompt templates, and the embedding rows of new tokens.

Token ids come from ``convert_tokens_to_ids`` and are checked to be single tokens (a peer took
``tokenizer("[SEG]").input_ids[0]``, which is the BOS token on some tokenizers).
"""

from __future__ import annotations

import math
import re
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AddedToken

from ppcr.config import TemplateConfig

SEM, LOC, SEMP, BOX_OPEN, BOX_CLOSE = "[SEM]", "[LOC]", "[SEMP]", "<box>", "</box>"
NEW_TOKENS = (SEM, LOC, SEMP, BOX_OPEN, BOX_CLOSE)
BOX_BINS = 1000
_BOX_TEXT = re.compile(r"<box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>")


@dataclass(frozen=True)
class TokenIds:
    sem: int
    loc: int
    semp: int
    box_close: int
    new: tuple[int, ...]  # every PPCR token, in NEW_TOKENS order


def add_ppcr_tokens(tokenizer, model: nn.Module) -> TokenIds:
    """Add the tokens (once), grow the embeddings if the vocabulary outgrew them, return the ids."""
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in NEW_TOKENS])
    ids = {}
    for t in NEW_TOKENS:
        i = tokenizer.convert_tokens_to_ids(t)
        pieces = tokenizer(t, add_special_tokens=False)["input_ids"]
        if i is None or i == tokenizer.unk_token_id or pieces != [i]:
            raise ValueError(f"token {t} is not a single token of this tokenizer (got ids {pieces}, id {i})")
        ids[t] = i
    weight = model.get_input_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 partitions hold size-0 tensors
    if max(ids.values()) >= rows:
        model.resize_token_embeddings(max(len(tokenizer), max(ids.values()) + 1), mean_resizing=True)
    return TokenIds(
        sem=ids[SEM], loc=ids[LOC], semp=ids[SEMP], box_close=ids[BOX_CLOSE], new=tuple(ids[t] for t in NEW_TOKENS)
    )


def box_text(box_cxcywh: torch.Tensor | list[float], bins: int = BOX_BINS) -> str:
    """Normalised (cx, cy, w, h) -> '<box>(x1,y1),(x2,y2)</box>' with integers in [0, bins) (Qwen2-VL's
    1000 by default)."""
    cx, cy, w, h = (float(v) for v in box_cxcywh)
    # Rounding first keeps float32 noise (0.5 - 0.1 = 0.39999998) out of the bin choice.
    q = [
        min(max(math.floor(round(v * bins, 3)), 0), bins - 1) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    ]
    return f"{BOX_OPEN}({q[0]},{q[1]}),({q[2]},{q[3]}){BOX_CLOSE}"


def parse_box_text(text: str, bins: int = BOX_BINS) -> torch.Tensor | None:
    """The first '<box>(x1,y1),(x2,y2)</box>' of a generated answer as normalised (cx, cy, w, h)."""
    m = _BOX_TEXT.search(text.replace(" ", ""))
    if not m:
        return None
    x1, y1, x2, y2 = ((min(int(v), bins - 1) + 0.5) / bins for v in m.groups())
    return torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, abs(x2 - x1), abs(y2 - y1)])


CE_ROLES = ("fixed", "digit1", "digit2", "digit3", "digit4")  # answer-token roles of the CE diagnostic


def digit_token_ids(tokenizer) -> torch.Tensor:
    """Ids of the digits 0-9 where each is one token of its own (Qwen2's and Llama's tokenizers split
    numbers into digits), else an empty tensor."""
    ids = [tokenizer(str(d), add_special_tokens=False)["input_ids"] for d in range(10)]
    return torch.tensor([i[0] for i in ids]) if all(len(i) == 1 for i in ids) else torch.zeros(0, dtype=torch.long)


def digit_roles(labels: torch.Tensor, digit_ids: torch.Tensor) -> torch.Tensor:
    """Per answer token (B, L), its index in :data:`CE_ROLES`: 0 for a fixed token, k for the k-th digit
    of a number (the last role for any further digit); -1 outside the answer (label -100)."""
    is_digit = torch.isin(labels, digit_ids.to(labels.device))
    count = is_digit.long().cumsum(-1)
    before_run = torch.where(is_digit, torch.zeros_like(count), count).cummax(-1).values
    roles = torch.where(is_digit, (count - before_run).clamp(max=len(CE_ROLES) - 1), torch.zeros_like(count))
    return torch.where(labels == -100, torch.full_like(roles, -1), roles)


def render_prompts(
    t: TemplateConfig,
    expression: str,
    category: str | None = None,
    box: torch.Tensor | None = None,
    bins: int = BOX_BINS,
) -> dict[str, str]:
    """The user text of both stages, and their answers when the ground truth is given (training)."""
    out = {
        "semantic_prompt": t.semantic_prompt.format(expression=expression),
        "spatial_prompt": t.spatial_prompt.format(expression=expression, semantic=SEMP),
    }
    if category is not None:
        out["semantic_answer"] = t.semantic_answer.format(category=category)
    if box is not None:
        out["spatial_answer"] = t.spatial_answer.format(box=box_text(box, bins))
    return out


def gathered(params: list[nn.Parameter]):
    """Whole tensors inside the block, also when ZeRO-3 has partitioned them (a no-op otherwise)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return nullcontext()


class TokenRows(nn.Module):
    """Input embeddings and LM head of the MLLM, where the rows of PPCR's new tokens can be separate
    trainable parameters while the rest stays frozen (ZeRO-3 cannot freeze part of one tensor)."""

    def __init__(
        self, embed: nn.Embedding, head: nn.Linear, new_ids: tuple[int, ...], own_in: bool, own_out: bool
    ) -> None:
        super().__init__()
        self.embed, self.head = [embed], [head]  # held, not registered: they belong to the MLLM
        self.register_buffer("new_ids", torch.tensor(new_ids, dtype=torch.long), persistent=False)
        with gathered([embed.weight, head.weight]):
            self.new_in = nn.Parameter(embed.weight[list(new_ids)].detach().clone()) if own_in else None
            rows_out = head.weight[list(new_ids)].detach().clone() if own_out else None
        self.head_rows = _HeadRows(head, self.new_ids, rows_out)

    @property
    def new_out(self) -> nn.Parameter | None:
        return self.head_rows.new_out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, H) input embeddings."""
        e = self.embed[0](ids)
        if self.new_in is None:
            return e
        match = ids.unsqueeze(-1) == self.new_ids  # (B, L, N)
        rows = match.to(e.dtype) @ self.new_in.to(e.dtype)  # (B, L, H): the matching new row, or 0
        return torch.where(match.any(-1, keepdim=True), rows, e)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., H) hidden states -> (..., V) logits."""
        return self.head_rows(h)


class _HeadRows(nn.Module):
    """The LM head with its new-token rows replaced; a module of its own so that ZeRO-3 gathers
    ``new_out`` when it runs."""

    def __init__(self, head: nn.Linear, new_ids: torch.Tensor, rows: torch.Tensor | None) -> None:
        super().__init__()
        self.head = [head]
        self.new_ids = new_ids
        self.new_out = nn.Parameter(rows) if rows is not None else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.head[0](h)
        if self.new_out is None:
            return out
        ids = self.new_ids.to(out.device)
        return out.index_copy(-1, ids, h @ self.new_out.to(h.dtype).t())
