"""Batched prediction: a row's answers, boxes and mask do not depend on its batch; the work shared by a
batch (vision, SAM's encoder, generation for every ablation) runs once."""

import pytest
import torch
from conftest import model_config

from ppcr.common.distributed import DistInfo
from ppcr.eval.evaluate import split_batches
from ppcr.model import generation
from ppcr.model.model import PPCRModel
from ppcr.model.predict import ABLATIONS, distinct, predict_items

ONE = DistInfo(rank=0, world_size=1, local_rank=0, node_rank=0)


def val_items(cfg, n):
    return [x for b in split_batches(cfg, cfg.eval.sets[0], ONE, batch_size=n, limit=n) for x in b]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_batch_gives_batch_one_answers_boxes_and_masks(tiny_shards, tiny_models, family):
    cfg = model_config(tiny_shards, tiny_models, family, "model.max_new_tokens=7")
    torch.manual_seed(0)
    model = PPCRModel.from_config(cfg.model, cfg.train.loss).eval()
    items = val_items(cfg, 6)
    assert len(distinct([x["mllm_image"] for x in items])[0]) < len(items)  # some rows share an image
    expressions = [x["expression"] for x in items]
    expressions[1] = expressions[1] + " on the left of everything else"  # prompts of different lengths
    batched, gen = predict_items(model, items, expressions)
    single = [predict_items(model, [x], [e])[0][0][0] for x, e in zip(items, expressions)]
    lengths = {len(model.tokenizer(a.spatial_answer)["input_ids"]) for a in single}
    assert len(lengths) > 1 or len(set(a.semantic_answer for a in single)) > 1  # rows stop at different steps
    for b, s in zip(batched[0], single):
        assert b.semantic_answer == s.semantic_answer and b.spatial_answer == s.spatial_answer
        assert b.stopped == s.stopped
        assert torch.allclose(b.box, s.box, atol=1e-5)
        assert torch.equal(b.mask, s.mask)
    assert gen.forwards <= 2 * (1 + cfg.model.max_new_tokens)


def test_ablations_share_one_generation_and_one_encoder_pass_per_image(tiny_shards, tiny_models, monkeypatch):
    cfg = model_config(tiny_shards, tiny_models, "llava", "model.max_new_tokens=5")
    torch.manual_seed(0)
    model = PPCRModel.from_config(cfg.model, cfg.train.loss).eval()
    items = val_items(cfg, 6)
    calls = {"decode": 0, "sam_images": 0}
    decode, encode = generation.decode, model.sam.encode

    def counting_decode(*a, **k):
        calls["decode"] += 1
        return decode(*a, **k)

    def counting_encode(images, sizes):
        calls["sam_images"] += len(images)
        return encode(images, sizes)

    monkeypatch.setattr(generation, "decode", counting_decode)
    monkeypatch.setattr(model.sam, "encode", counting_encode)
    preds, _ = predict_items(model, items, [x["expression"] for x in items], ablations=ABLATIONS)
    assert calls == {"decode": 2, "sam_images": len(distinct([x["mllm_image"] for x in items])[0])}
    assert len(preds) == len(ABLATIONS) and all(len(rows) == len(items) for rows in preds)
    head = preds[0]
    for rows in preds[1:]:  # the answers are shared, the masks come from different prompts
        assert [r.spatial_answer for r in rows] == [r.spatial_answer for r in head]
    assert any(not torch.equal(a.mask_logits, b.mask_logits) for a, b in zip(preds[0], preds[-1]))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_bf16_model_predicts_in_bf16_everywhere(tiny_shards, tiny_models, family):
    cfg = model_config(
        tiny_shards, tiny_models, family, "model.max_new_tokens=5", "model.dtype=bfloat16", "train.precision=bf16"
    )
    torch.manual_seed(0)
    model = PPCRModel.from_config(cfg.model, cfg.train.loss).eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # SAM and the heads too
    items = val_items(cfg, 3)
    (preds,), gen = predict_items(model, items, [x["expression"] for x in items])
    assert gen.semsp.dtype == torch.bfloat16 and gen.sam_embeddings.dtype == torch.bfloat16
    for p, x in zip(preds, items):
        assert p.mask_logits.shape == x["mask"].shape and torch.isfinite(p.mask_logits).all()
        assert p.box.dtype == torch.float32 and torch.isfinite(p.box).all()
