"""``ppcr-pretrain``: pretrain the tiny backbones a recipe names, the way real ones come pretrained.

    ppcr-pretrain --config launch/configs/default.yaml                 # all stages (make pretrain)
    ppcr-pretrain --config launch/configs/default.yaml --stages sam    # one stage
    ppcr-pretrain --config RECIPE pretrain.vision.steps=200 ...        # shorter, e.g. to check it moves

Stages, each on synthetic scenes of ``pretrain.seed`` (never the dataset's images):

1. ``vision``: the tiny MLLM's vision tower and projector, dense targets per image token
   (:mod:`ppcr.pretrain.vision`);
2. ``grounding``: its language model, dense grounding and grounding questions in text, the vision
   tower frozen (:mod:`ppcr.pretrain.grounding`);
3. ``sam``: the tiny SAM, box (with jitter) -> mask (:mod:`ppcr.pretrain.sam`).

The MLLM is written with ``save_pretrained`` to ``model.mllm_path`` and SAM as a state dict to
``model.sam_checkpoint`` (``.safetensors`` or ``.pth``): the layouts a download gives, loaded by the
same code. The vision stage's per-token box head is kept beside the MLLM's weights
(``ppcr.model.pointer.TOKEN_BOX_FILE``): PPCR's pointer box head starts its per-token regressor from it.
The learning curves go to ``pretrain_curve.jsonl`` beside the MLLM. Deterministic: the same config gives
the same weights, whether the stages run in one command or one by one (each seeds what it builds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from ppcr.config import Config, ConfigError, load_config
from ppcr.data.transforms import Preprocessor, box_pair_iou
from ppcr.model.mllm import family_of, image_token_id, load_mllm
from ppcr.model.pointer import TOKEN_BOX_FILE
from ppcr.model.sam import SamSegmenter, build_sam, save_sam_state
from ppcr.model.tiny import build_tiny_mllm
from ppcr.pretrain.grounding import grounding_box, grounding_examples, grounding_loss
from ppcr.pretrain.loop import fit
from ppcr.pretrain.sam import collate_scenes, sam_items, sam_loss, sam_scores
from ppcr.pretrain.scenes import SceneStream, draw, scene_config
from ppcr.pretrain.vision import DenseHeads, dense_targets, token_grid

STAGES = ("vision", "grounding", "sam")
HELD_OUT = 10_000_000  # held-out scenes are indices from here on; training scenes count from 0


def _loader(stream: SceneStream, batch_size: int, collate, workers: int) -> DataLoader:
    return DataLoader(
        stream,
        batch_size=batch_size,
        collate_fn=collate,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(0),
    )


def _stack(items: list[dict]) -> dict:
    return {
        k: (torch.stack([it[k] for it in items]) if isinstance(items[0][k], torch.Tensor) else [it[k] for it in items])
        for k in items[0]
    }


class MllmPretraining:
    """The MLLM's two stages, sharing the loaded model."""

    def __init__(self, cfg: Config, path: Path) -> None:
        self.cfg, self.pt = cfg, cfg.pretrain
        self.mllm, self.processor = load_mllm(path)
        self.family = family_of(self.mllm)
        self.image_token = image_token_id(self.mllm)
        self.pre = Preprocessor.from_config(cfg.model)
        self.cell, _ = token_grid(self.family, cfg.model.mllm_image_size)
        self.scenes = scene_config(cfg.data.synthetic, self.pt.seed)
        self.bins = cfg.model.box_bins
        # the vision stage's per-token box head (DenseHeads.box), kept for the pointer box head
        self.token_box_head = load_file(path / TOKEN_BOX_FILE) if (path / TOKEN_BOX_FILE).is_file() else None

    # -- vision

    def _vision_item(self, scene) -> dict:
        image = self.pre.mllm_image(scene.image)
        return {"image": image, **dense_targets(scene, image, self.cell)}

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        vision = dict(self.processor.image_processor(images=list(images), return_tensors="pt"))
        feats = self.family.image_features(vision)
        return feats.reshape(len(images), -1, feats.shape[-1])

    def vision(self, curve: Path) -> list[dict]:
        st = self.pt.vision
        heads = DenseHeads(self.mllm.config.get_text_config().hidden_size)
        params = [p for m in self.family.vision_modules for p in m.parameters()] + list(heads.parameters())
        for p in params:
            p.requires_grad_(True)
        held = [
            _stack(
                [self._vision_item(draw(self.scenes, HELD_OUT + i)) for i in range(j, min(j + 32, self.pt.eval_scenes))]
            )
            for j in range(0, self.pt.eval_scenes, 32)
        ]

        def step_loss(batch: dict):
            return heads(self._features(batch["image"]), batch)

        @torch.no_grad()
        def evaluate() -> dict:
            sums: dict[str, float] = {}
            for b in held:
                _, figures = heads(self._features(b["image"]), b)
                for k, v in figures.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / len(held)
            return sums

        loader = _loader(SceneStream(self.scenes, self._vision_item), st.batch_size, _stack, self.pt.num_workers)
        rows = fit(
            "vision",
            params,
            step_loss,
            iter(loader),
            st,
            evaluate=evaluate,
            log_every=self.pt.log_every,
            eval_every=self.pt.eval_every,
            curve=curve,
        )
        self.token_box_head = {k: v.detach().clone().contiguous() for k, v in heads.box.state_dict().items()}
        return rows

    # -- grounding

    def _grounding_items(self, scene) -> list[tuple]:
        image = self.pre.mllm_image(scene.image)
        return [(image, prompt, answer, box) for prompt, answer, box in grounding_examples(scene, self.bins)]

    def grounding(self, curve: Path) -> list[dict]:
        st = self.pt.grounding
        vision = {id(p) for m in self.family.vision_modules for p in m.parameters()}
        params = []
        for p in self.mllm.parameters():
            p.requires_grad_(id(p) not in vision)
            if p.requires_grad:
                params.append(p)
        held = [x for i in range(self.pt.eval_scenes) for x in self._grounding_items(draw(self.scenes, HELD_OUT + i))]
        questions = [x for x in held if x[3] is not None]

        def step_loss(batch: list[tuple]):
            return grounding_loss(self.mllm, self.processor, self.family, self.image_token, [x[:3] for x in batch])

        @torch.no_grad()
        def evaluate() -> dict:
            ce = sum(float(step_loss(held[j : j + 16])[0]) for j in range(0, len(held), 16)) / len(
                range(0, len(held), 16)
            )
            hits = 0
            for image, prompt, _, box in questions:
                pred = grounding_box(self.mllm, self.processor, self.family, self.image_token, image, prompt, self.bins)
                if pred is not None:
                    hits += box_pair_iou(pred, torch.tensor(box)) >= 0.5
            return {"ce": ce, "box_acc50": hits / max(len(questions), 1)}

        loader = _loader(
            SceneStream(self.scenes, self._grounding_items),
            st.batch_size,
            lambda scenes: [x for s in scenes for x in s],
            self.pt.num_workers,
        )
        self.mllm.train()
        rows = fit(
            "grounding",
            params,
            step_loss,
            iter(loader),
            st,
            evaluate=evaluate,
            log_every=self.pt.log_every,
            eval_every=self.pt.eval_every,
            curve=curve,
        )
        self.mllm.eval()
        return rows

    def save(self, out: Path) -> None:
        for p in self.mllm.parameters():
            p.requires_grad_(True)
        self.mllm.save_pretrained(out)
        self.processor.save_pretrained(out)
        if self.token_box_head is not None:
            save_file(self.token_box_head, out / TOKEN_BOX_FILE)


def pretrain_sam(cfg: Config, curve: Path) -> tuple[torch.nn.Module, list[dict]]:
    pt, m = cfg.pretrain, cfg.model
    torch.manual_seed(pt.seed + 1)  # SAM's initial weights do not depend on which stages ran before it
    sam = build_sam(m.sam_arch, m.sam_image_size)
    seg = SamSegmenter(sam)
    pre = Preprocessor.from_config(m)
    scenes = scene_config(cfg.data.synthetic, pt.seed + 1)  # other scenes than the MLLM's
    held = [
        collate_scenes([sam_items(draw(scenes, HELD_OUT + i), pre) for i in range(j, min(j + 8, pt.eval_scenes))])
        for j in range(0, pt.eval_scenes, 8)
    ]
    generator = torch.Generator().manual_seed(pt.seed)
    params = list(sam.parameters())

    def step_loss(batch: dict):
        return sam_loss(seg, batch, pt.sam_jitter, generator)

    def evaluate() -> dict:
        return sam_scores(seg, held, pt.sam_jitter)

    loader = _loader(
        SceneStream(scenes, lambda s: sam_items(s, pre)), pt.sam.batch_size, collate_scenes, pt.num_workers
    )
    rows = fit(
        "sam",
        params,
        step_loss,
        iter(loader),
        pt.sam,
        evaluate=evaluate,
        log_every=pt.log_every,
        eval_every=pt.eval_every,
        curve=curve,
    )
    return sam, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ppcr-pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="recipe YAML (model.tiny_family must be set)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {', '.join(STAGES)}")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = sorted(set(stages) - set(STAGES))
        if unknown or not stages:
            raise ConfigError(f"--stages: unknown stage(s) {unknown} (stages: {', '.join(STAGES)})")
        if cfg.model.tiny_family is None:
            raise ConfigError(
                "model.tiny_family is not set: this recipe loads a real checkpoint, which comes pretrained"
            )
        if cfg.model.sam_type != "tiny" and "sam" in stages:
            raise ConfigError(f"model.sam_type is '{cfg.model.sam_type}': only the tiny SAM is pretrained here")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(cfg.pretrain.seed)
    m = cfg.model
    out = Path(m.mllm_path)
    summary: dict = {"stages": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        curve = work / "pretrain_curve.jsonl"
        if out.joinpath("pretrain_curve.jsonl").is_file():
            shutil.copy(out / "pretrain_curve.jsonl", curve)
            keep = [json.loads(line) for line in curve.read_text().splitlines()]
            curve.write_text("".join(json.dumps(r) + "\n" for r in keep if r["stage"] not in stages))
        if {"vision", "grounding"} & set(stages):
            start = out
            if "vision" in stages:  # from random weights
                start = build_tiny_mllm(
                    m.tiny_family, work / "init", image_size=m.mllm_image_size, arch=m.tiny_mllm, seed=cfg.pretrain.seed
                )
            job = MllmPretraining(cfg, start)
            for stage in ("vision", "grounding"):
                if stage in stages:
                    t0 = time.perf_counter()
                    rows = getattr(job, stage)(curve)
                    summary["stages"][stage] = {"seconds": round(time.perf_counter() - t0, 1), "last": rows[-1]}
            job.save(work / "mllm")
            if out.exists():
                shutil.rmtree(out)
            shutil.copytree(work / "mllm", out)
        if "sam" in stages:
            t0 = time.perf_counter()
            sam, rows = pretrain_sam(cfg, curve)
            summary["stages"]["sam"] = {"seconds": round(time.perf_counter() - t0, 1), "last": rows[-1]}
            save_sam_state(sam.state_dict(), m.sam_checkpoint)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(curve, out / "pretrain_curve.jsonl")
    print(json.dumps(summary["stages"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
