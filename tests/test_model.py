import traceback

import numpy as np
import pytest
import torch
from conftest import model_config
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.ops import box_convert, box_iou

from ppcr.data.shards import decode_sample, iter_tar_samples, load_manifest
from ppcr.data.stream import build_train_loader
from ppcr.model.lora import use_branch
from ppcr.model.losses import TERMS, text_ce, total_loss
from ppcr.model.model import PPCRModel
from ppcr.model.params import component, parameter_counts, parameter_table
from ppcr.model.predict import predict
from ppcr.model.saving import load_pretrained, save_pretrained
from ppcr.model.tokens import CE_ROLES, NEW_TOKENS, box_text, digit_roles, parse_box_text, render_prompts
from ppcr.train.loop import Window

FAMILIES = ("qwen2_5_vl", "llava")


def build(tiny_shards, tiny_models, family, *overrides):
    cfg = model_config(tiny_shards, tiny_models, family, *overrides)
    torch.manual_seed(0)
    model = PPCRModel.from_config(cfg.model, cfg.train.loss)
    batch = next(iter(build_train_loader(cfg, 0, 1)))
    return model, batch, cfg


def grads_by_component(model):
    out = {}
    for name, p in model.named_parameters():
        c = component(name)
        g = 0.0 if p.grad is None else float(p.grad.abs().sum())
        tr, has = out.get(c, (p.requires_grad, False))
        out[c] = (tr, has or p.grad is not None and g > 0)
        if not p.requires_grad:
            assert p.grad is None, f"frozen {name} got a gradient"
    return out


@pytest.mark.parametrize("rows", ["new_rows", "full"])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_reaches_every_trainable_group(tiny_shards, tiny_models, family, rows):
    model, batch, cfg = build(
        tiny_shards, tiny_models, family, f"model.trainable.embeddings={rows}", f"model.trainable.lm_head={rows}"
    )
    out = model(batch)
    assert set(TERMS) <= set(out) and all(torch.isfinite(out[t]) for t in TERMS)
    assert torch.allclose(out["loss"], total_loss({t: out[t] for t in TERMS}, cfg.train.loss))
    assert out["boxes"].shape == (2, 4) and ((out["boxes"] > 0) & (out["boxes"] < 1)).all()
    out["loss"].backward()
    groups = grads_by_component(model)
    trained = {c for c, (tr, _) in groups.items() if tr}
    rows_groups = {"new_token_rows"} if rows == "new_rows" else {"embeddings", "lm_head"}
    assert trained == {"lora_semantic", "lora_spatial", "projectors", "box_head", "sam_mask_decoder"} | rows_groups
    for c in trained:
        assert groups[c][1], f"trainable group {c} got no gradient"
    frozen = {c for c, (tr, _) in groups.items() if not tr}
    assert {"vision_tower", "llm_base", "sam_image_encoder", "sam_prompt_encoder", "sam_decoder_unused"} <= frozen
    assert rows == "full" or {"embeddings", "lm_head"} <= frozen


@pytest.mark.parametrize("family", FAMILIES)
def test_stage_two_loss_reaches_branch_a_only_through_semsp(tiny_shards, tiny_models, family):
    model, batch, _ = build(tiny_shards, tiny_models, family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)

    def semantic_grad():
        return sum(
            float(p.grad.abs().sum())
            for n, p in model.named_parameters()
            if component(n) == "lora_semantic" and p.grad is not None
        )

    model(batch)["ce_spa"].backward()
    assert semantic_grad() > 0
    model.zero_grad(set_to_none=True)

    class Cut(nn.Module):  # the same projection, with the SemSP path to stage 1 cut
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x.detach())

    model.sem_to_llm = Cut(model.sem_to_llm)
    model(batch)["ce_spa"].backward()
    assert semantic_grad() == 0


def test_vision_features_are_computed_once_per_step(tiny_shards, tiny_models, monkeypatch):
    model, batch, _ = build(tiny_shards, tiny_models, "qwen2_5_vl")
    calls = []
    original = model.family.image_features
    monkeypatch.setattr(model.family, "image_features", lambda v: calls.append(1) or original(v))
    model(batch)
    assert len(calls) == 1


def test_switching_branch_keeps_trainable_set(tiny_shards, tiny_models):
    model, _, _ = build(tiny_shards, tiny_models, "llava")
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    for b in ("spatial", "semantic", "spatial"):
        use_branch(model.mllm, b)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == before
    layer = next(m for n, m in model.mllm.named_modules() if n.endswith("language_model.layers.0.self_attn.q_proj"))
    assert layer.active_adapters == ["spatial"]


def test_tokens_templates_and_labels(tiny_shards, tiny_models):
    model, batch, cfg = build(tiny_shards, tiny_models, "qwen2_5_vl")
    tok = model.tokenizer
    for t in NEW_TOKENS:
        i = tok.convert_tokens_to_ids(t)
        assert tok(t, add_special_tokens=False)["input_ids"] == [i]
    assert model.ids.sem == tok.convert_tokens_to_ids("[SEM]") != model.ids.loc
    box = torch.tensor([0.5, 0.25, 0.2, 0.1])
    text = box_text(box)
    assert text == "<box>(400,200),(600,300)</box>"
    assert torch.allclose(parse_box_text(text), box, atol=1e-3)
    assert parse_box_text("no box here") is None
    texts = render_prompts(cfg.model.templates, "the red circle", "circle", box)
    stage, _ = model.encode([texts["spatial_prompt"]], [texts["spatial_answer"]], [batch["mllm_images"][0]])
    labelled = stage.labels[0] != -100
    answer_ids = stage.input_ids[0][labelled]
    assert tok.decode(answer_ids) == texts["spatial_answer"]
    assert labelled.nonzero().min() > (stage.input_ids[0] == model.ids.semp).nonzero().max()  # prompt unlabelled
    assert int((stage.input_ids[0] == model.image_token_id).sum()) == 16  # 112 px, 14 px patches, 2x2 merge
    # The CE diagnostic's roles: each coordinate's hundreds, tens and ones digit, the rest fixed.
    roles = digit_roles(stage.labels[:, 1:], model.digit_ids)[0]
    digits = [int(r) for r in roles[roles >= 0] if r > 0]
    assert digits == [1, 2, 3] * 4
    assert CE_ROLES[0] == "fixed" and int((roles == 0).sum()) == len(answer_ids) - 12


def test_parameter_table_and_policy(tiny_shards, tiny_models):
    model, _, _ = build(
        tiny_shards,
        tiny_models,
        "llava",
        "model.trainable.vision_tower=true",
        "model.trainable.embeddings=full",
        "model.trainable.lm_head=full",
    )
    counts = parameter_counts(model)
    assert sum(a + b for a, b in counts.values()) == sum(p.numel() for p in model.parameters())
    assert counts["vision_tower"][1] == 0 and counts["vision_tower"][0] > 0
    assert counts["embeddings"][1] == 0 and "new_token_rows" not in counts
    table = parameter_table(model)
    assert table.splitlines()[0].split() == ["component", "trainable", "frozen", "count"]
    assert "total" in table.splitlines()[-1]


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_gives_identical_outputs(tiny_shards, tiny_models, family, tmp_path):
    model, batch, cfg = build(tiny_shards, tiny_models, family, "model.trainable.embeddings=new_rows")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # move every trained part away from its initial value
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        before = model(batch)
    save_pretrained(model, cfg, tmp_path / "saved")
    loaded, loaded_cfg = load_pretrained(tmp_path / "saved")
    assert loaded_cfg.model.lora == cfg.model.lora
    with torch.no_grad():
        after = loaded(batch)
    for k in (*TERMS, "boxes", "mask_logits"):
        assert torch.allclose(before[k], after[k], atol=1e-5), k
    image = np.zeros((80, 100, 3), np.uint8)
    image[20:60, 30:70] = (200, 40, 40)
    a, b = predict(model, [image], ["the red square"])[0], predict(loaded, [image], ["the red square"])[0]
    assert a.semantic_answer == b.semantic_answer and a.spatial_answer == b.spatial_answer
    assert torch.allclose(a.mask_logits, b.mask_logits, atol=1e-4)


def test_overfit_one_batch_then_predict_reproduces_it_by_generation(tiny_shards, tiny_models):
    model, batch, cfg = build(
        tiny_shards,
        tiny_models,
        "qwen2_5_vl",
        "train.micro_batch_size=4",
        "model.trainable.embeddings=full",
        "model.trainable.lm_head=full",
    )
    steps = 300
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    first = None
    for _ in range(steps):
        out = model(batch)
        if first is None:
            first = {t: float(out[t]) for t in TERMS}
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        out = model(batch)
    last = {t: float(out[t]) for t in TERMS}
    for t in TERMS:
        assert last[t] < 0.5 * first[t], (t, first[t], last[t])
    assert last["ce_sem"] < 0.05 and last["ce_spa"] < 0.1

    gt = box_convert(batch["boxes"], "cxcywh", "xyxy")
    assert box_iou(box_convert(out["boxes"], "cxcywh", "xyxy"), gt).diag().min() > 0.8
    sizes, originals = batch["input_sizes"].tolist(), batch["original_sizes"].tolist()
    forced = [model.sam.to_original(out["mask_logits"][i], sizes[i], originals[i]) > 0 for i in range(4)]

    def iou(a, b):
        return float((a & b).sum()) / max(float((a | b).sum()), 1.0)

    assert min(iou(f, m > 0) for f, m in zip(forced, batch["masks"])) > 0.9

    # Generation alone, from the raw images and expressions, gives the same answers, boxes and masks.
    samples = {}
    for shard in load_manifest(tiny_shards)["splits"]["train"]["shards"]:
        for raw in iter_tar_samples(tiny_shards / shard["name"]):
            if raw["__key__"] in batch["keys"]:
                samples[raw["__key__"]] = decode_sample(raw)["image"].permute(1, 2, 0).numpy()  # (H, W, 3)
    preds = predict(model, [samples[k] for k in batch["keys"]], batch["expressions"])
    for i, p in enumerate(preds):
        assert p.stopped == {"semantic": True, "spatial": True}
        assert p.semantic_answer.strip() == f"the {batch['categories'][i]} [SEM]"
        assert p.spatial_answer.strip() == f"[LOC] {box_text(batch['boxes'][i], cfg.model.box_bins)}"
        assert p.box_agreement is not None and p.box_agreement > 0.8
        assert iou(p.mask, forced[i]) > 0.98
        assert iou(p.mask, batch["masks"][i] > 0) > 0.9
        assert set(p.timings) == {"vision", "semantic", "spatial", "sam"}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_shards, tiny_models):
    results = []
    for flag in ("false", "true"):
        model, batch, _ = build(tiny_shards, tiny_models, "qwen2_5_vl", f"model.gradient_checkpointing={flag}")
        model.train()
        out = model(batch)
        out["loss"].backward()
        results.append((float(out["loss"]), model.box_head.query[1].weight.grad.clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


class HostSyncs(TorchDispatchMode):
    """Records the operators that make the host wait for the device: a tensor's value read into Python
    (.item(), float(), bool(), .tolist()) or an output whose shape depends on the data (nonzero, boolean
    masking). Each is attributed to the first frame outside torch and site-packages: ppcr's code or this
    test ("ours"), or a library's."""

    OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal", "aten::masked_select"}

    def __enter__(self):
        self.calls = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.OPS:
            frame = next(f for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename)
            ours = "site-packages" not in frame.filename
            self.calls.append((func._schema.name, f"{frame.filename}:{frame.lineno}", ours))
        return func(*args, **(kwargs or {}))


def test_the_device_side_of_a_step_never_waits_for_the_device(tiny_shards, tiny_models):
    model, batch, _ = build(tiny_shards, tiny_models, "qwen2_5_vl")
    inputs = model.prepare(batch)  # the host side: tokenising, positions, markers; then one copy to the device
    window = Window()
    with HostSyncs() as syncs:
        out = model.compute(inputs)
        out["loss"].backward()
        window.add(out, len(batch["keys"]), 0.0, 0.0)
    assert [c for c in syncs.calls if c[2]] == []
    with HostSyncs() as syncs:  # the detector sees what the loop used to do: float() of every loss term
        [float(out[t]) for t in TERMS]
    assert len([c for c in syncs.calls if c[2]]) == len(TERMS)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_loss_at_labelled_positions_only_equals_the_full_logits_loss(tiny_shards, tiny_models, family):
    model, batch, _ = build(tiny_shards, tiny_models, family)
    x = model.prepare(batch)
    with torch.no_grad():
        h = model.language_stages(x.semantic, x.spatial, model.vision_features(x.vision))
        for hidden, stage in ((h["h1"], x.semantic), (h["h2"], x.spatial)):
            full = model.token_rows.logits(hidden)  # (B, L, V): what the loss computed before
            expected = torch.nn.functional.cross_entropy(
                full[:, :-1].flatten(0, 1).float(), stage.labels[:, 1:].flatten(), ignore_index=-100
            )
            assert float(text_ce(hidden, stage, model.token_rows.logits)) == pytest.approx(float(expected), rel=1e-6)
            assert len(stage.targets) == int((stage.labels != -100).sum()) < 0.5 * stage.labels.numel()


def test_attention_kernels_give_the_same_loss_and_flash_attention_is_checked_before_a_run(
    tiny_shards, tiny_models, tmp_path
):
    from ppcr.config import ConfigError
    from ppcr.train.preflight import check_run_inputs

    losses = []
    for impl in ("sdpa", "eager"):
        model, batch, _ = build(tiny_shards, tiny_models, "qwen2_5_vl", f"model.attn_implementation={impl}")
        assert model.mllm.base_model.model.config._attn_implementation == impl
        with torch.no_grad():
            losses.append(float(model(batch)["loss"]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    cfg = model_config(tiny_shards, tiny_models, "qwen2_5_vl", "model.attn_implementation=flash_attention_2")
    needs = r"'flash_attention_2' needs the flash-attn package.*a CUDA GPU.*a 16-bit model.dtype"
    with pytest.raises(ConfigError, match=needs):
        check_run_inputs(cfg, 1, tmp_path / "run")
