"""The pointer box head (ppcr/model/pointer.py): its targets, its selection, its seeding from the vision
pretraining, that it learns to select, and that it never reads the ground-truth box text."""

from __future__ import annotations

import pytest
import torch
from conftest import model_config

from ppcr.data.stream import build_train_loader
from ppcr.model.heads import ImageTokens
from ppcr.model.model import PPCRModel
from ppcr.model.pointer import (
    PointerBoxHead,
    TokenBoxRegressor,
    pointer_losses,
    selected_weights,
    token_centres,
    token_cover,
)
from ppcr.pretrain.vision import DenseHeads

FAMILIES = ("qwen2_5_vl", "llava")


def test_cover_is_the_targets_share_of_each_token_inside_the_image_region():
    masks = torch.zeros(1, 8, 8, dtype=torch.uint8)
    masks[0, :4, :4] = 1  # the left half of a 4 x 8 image; rows 4-7 are SAM's padding
    masks[0, 6:, :] = 1  # padding that is set must not count
    cover = token_cover(masks, torch.tensor([[4, 8]]), (2, 2))
    assert cover.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    assert torch.allclose(
        token_centres((2, 3)),
        torch.tensor([[1 / 6, 0.25], [0.5, 0.25], [5 / 6, 0.25], [1 / 6, 0.75], [0.5, 0.75], [5 / 6, 0.75]]),
    )


def test_selection_keeps_the_best_tokens_object_only():
    a, b = [0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.9, 0.9]
    corners = torch.tensor([[a, a, b, b]])
    logits = torch.log(torch.tensor([[0.3, 0.2, 0.25, 0.25]]))  # object b holds more mass, token 0 the most
    w = selected_weights(logits, corners)
    assert torch.allclose(w, torch.tensor([[0.6, 0.4, 0.0, 0.0]]))


def test_the_regressor_seeded_from_the_vision_pretraining_gives_its_boxes():
    torch.manual_seed(0)
    pretrained = DenseHeads(16).box
    reg = TokenBoxRegressor(16, 16)
    reg.seed({k: v.clone() for k, v in pretrained.state_dict().items()}, "test")
    feats = torch.randn(2, 5, 16)
    raw = pretrained(feats).sigmoid()  # DenseHeads' own reading of its head
    expected = torch.cat([torch.minimum(raw[..., :2], raw[..., 2:]), torch.maximum(raw[..., :2], raw[..., 2:])], -1)
    assert torch.allclose(reg(feats, token_centres((1, 5))), expected, atol=1e-6)
    with pytest.raises(ValueError, match="model.box_head_hidden"):
        TokenBoxRegressor(16, 32).seed(pretrained.state_dict(), "test")


def test_the_pointer_learns_to_select_the_queried_token_and_read_its_box():
    """Tokens carry one of 6 colours; SpaSP names one; each row's target is the one token of that colour.
    A head whose scores, softmax or gathers were wrong would not get there."""
    torch.manual_seed(0)
    hidden, t, b = 16, 9, 32
    head = PointerBoxHead(hidden, 32)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    centres = token_centres((3, 3))

    def batch():
        colours = torch.stack([torch.randperm(6)[:1].repeat(t) for _ in range(b)])  # background colour
        target = torch.randint(0, t, (b,))
        colours[torch.arange(b), target] = (colours[torch.arange(b), target] + 1 + torch.randint(0, 5, (b,))) % 6
        states = torch.nn.functional.one_hot(colours, hidden).float()
        features = torch.cat([states[..., :8], centres.expand(b, t, 2).repeat(1, 1, 4)], -1)
        spasp = torch.nn.functional.one_hot(colours[torch.arange(b), target], hidden).float()
        cover = torch.nn.functional.one_hot(target, t).float()
        cx, cy = centres[target].unbind(-1)
        box = torch.stack([cx, cy, torch.full_like(cx, 0.3), torch.full_like(cx, 0.3)], -1)
        return spasp, ImageTokens(states, features, centres), cover, box, target

    for _ in range(150):
        spasp, tokens, cover, box, _ = batch()
        out = head(spasp, tokens)
        losses = pointer_losses(out, cover, box)
        loss = losses["point"] + 5 * losses["token_l1"] + 5 * torch.nn.functional.l1_loss(out.box, box)
        opt.zero_grad()
        loss.backward()
        opt.step()
    spasp, tokens, cover, box, target = batch()
    with torch.no_grad():
        out = head(spasp, tokens)
    assert (out.token_logits.argmax(-1) == target).float().mean() > 0.95
    assert (out.box - box).abs().mean() < 0.05


@pytest.mark.parametrize("family", FAMILIES)
def test_the_box_never_reads_the_ground_truth_box_text(tiny_shards, tiny_models, family):
    """Teacher-forced with two different ground-truth boxes in the answer text, the head's box is the
    same: the image tokens and [LOC] come before the box text (also with the query before the image)."""
    for query_first in ("false", "true"):
        cfg = model_config(tiny_shards, tiny_models, family, f"model.query_first={query_first}")
        torch.manual_seed(0)
        model = PPCRModel.from_config(cfg.model, cfg.train.loss).eval()
        batch = next(iter(build_train_loader(cfg, 0, 1)))
        other = dict(batch, boxes=1 - batch["boxes"])  # a different box text, the same image and expression
        with torch.no_grad():
            a, b = model(batch), model(other)
        assert not torch.equal(a["l1"], b["l1"])  # the targets did change
        assert torch.equal(a["boxes"], b["boxes"])


@pytest.mark.parametrize("family", FAMILIES)
def test_query_first_puts_the_text_before_the_image_and_the_tokens_are_gathered(tiny_shards, tiny_models, family):
    cfg = model_config(tiny_shards, tiny_models, family, "model.query_first=true")
    model = PPCRModel.from_config(cfg.model, cfg.train.loss)
    image = torch.zeros(3, 112, 112, dtype=torch.uint8)
    stage, _ = model.encode(["where is the red circle"], None, [image])
    ids = stage.input_ids[0].tolist()
    assert "red circle" in model.tokenizer.decode(ids[: ids.index(model.image_token_id)])
    states = torch.randn(*stage.input_ids.shape, 8)
    gathered = model.image_tokens(states, stage, torch.zeros(stage.image_tokens, 8))
    assert torch.equal(gathered.states[0], states[0][stage.input_ids[0] == model.image_token_id])
    assert gathered.centres.shape == (stage.image_tokens, 2)
    # a template that renders images first whatever the order (llava-hf's) is refused, naming the key
    model.processor.chat_template = model.processor.chat_template.replace(
        "{% for content in message['content'] %}", "{% for content in message['content'] | sort(attribute='type') %}"
    )
    with pytest.raises(ValueError, match="model.query_first"):
        model._check_query_first()
