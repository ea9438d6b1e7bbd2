"""The model card of an export (its ``README.md``), written from the run: what the model is, what it was
built from (base models with their hub revisions or weight hashes, and licences), what it was trained on
and for how long, how ``make eval`` scored this checkpoint, how to load it, and its limitations.

The header is the hub's metadata (license, base_model, datasets, tags; huggingface_hub's ``ModelCardData``),
so a pushed export is described and filed on the hub. The facts the card is built from are also kept in
the header (``ppcr:``), so that exporting an export again keeps them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData, metadata_load, try_to_load_from_cache

from ppcr.common.hashing import file_sha256
from ppcr.config import Config
from ppcr.model.mllm import HUB_SNAPSHOT, looks_like_hub_id
from ppcr.model.sam import SAM_RELEASES

# The 7B recipes' MLLMs (README "Real data and weights") by directory name: hub id and licence, for a
# local copy that carries no card of its own.
KNOWN_MLLMS = {
    "Qwen2.5-VL-7B-Instruct": ("Qwen/Qwen2.5-VL-7B-Instruct", "apache-2.0"),
    "llava-1.5-7b-hf": ("llava-hf/llava-1.5-7b-hf", "llama2"),
}
LICENCES = {
    "apache-2.0": "Apache License 2.0",
    "llama2": "Llama 2 Community License Agreement",
    "mit": "MIT License",
    "other": "see the base model's own card",
}
PPCR_LICENCE = "apache-2.0"  # this repository's (LICENSE): ppcr's own tiny backbones come under it


@dataclass
class BaseModel:
    """One model an export was built from."""

    part: str  # "MLLM" or "SAM"
    name: str  # a hub id, a release's file name, or where ppcr's own tiny model came from
    hub_id: str | None  # for the card's base_model metadata
    revision: str | None  # the hub commit the weights came from, where known
    sha256: str | None  # of the weight files, where no revision is known
    licence: str  # a hub licence id ("apache-2.0", "llama2", "other")


def sha256_of(paths: list[Path]) -> str:
    """The SHA-256 of one weight file; for several (sharded weights), the SHA-256 of their ``sha256sum`` lines
    ("<hash>  <name>", in the order given). File hashes are cached (:func:`ppcr.common.hashing.file_sha256`),
    shared with the base fingerprints every load checks."""
    if len(paths) == 1:
        return file_sha256(paths[0])
    return hashlib.sha256("".join(f"{file_sha256(p)}  {p.name}\n" for p in paths).encode()).hexdigest()


def _weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return [d / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(d.glob("*.safetensors"))


def describe_mllm(cfg: Config) -> BaseModel:
    """The MLLM of ``cfg.model.mllm_path``: a hub id (the commit the run pinned, ``model.mllm_revision``, else its
    cached revision), a hub cache snapshot, a directory written by ``hf download --local-dir`` (its download
    metadata names the commit), ppcr's own tiny model, or any other directory (a hash of its weights)."""
    path, tiny = cfg.model.mllm_path, cfg.model.tiny_family
    if not Path(path).is_dir() and looks_like_hub_id(path):
        cached = try_to_load_from_cache(path, "config.json", revision=cfg.model.mllm_revision)
        m = HUB_SNAPSHOT.search(str(cached)) if isinstance(cached, str) else None
        licence = _hub_licence(Path(cached).parent, path) if isinstance(cached, str) else "other"
        return BaseModel(
            part="MLLM", name=path, hub_id=path, revision=m["rev"] if m else None, sha256=None, licence=licence
        )
    d = Path(path).resolve()
    m = HUB_SNAPSHOT.search(str(d))
    if m:
        hub_id = f"{m['org']}/{m['name']}"
        return BaseModel(
            part="MLLM", name=hub_id, hub_id=hub_id, revision=m["rev"], sha256=None, licence=_hub_licence(d, hub_id)
        )
    hub_id, licence = KNOWN_MLLMS.get(d.name, (None, None))
    commit = _downloaded_commit(d)
    if commit is not None:
        return BaseModel(
            part="MLLM",
            name=hub_id or d.name,
            hub_id=hub_id,
            revision=commit,
            sha256=None,
            licence=_hub_licence(d, hub_id, licence),
        )
    if tiny is not None:
        return BaseModel(
            part="MLLM",
            name=f"ppcr's tiny {tiny} ({path}; ppcr-tiny, ppcr-pretrain)",
            hub_id=None,
            revision=None,
            sha256=sha256_of(_weight_files(d)),
            licence=PPCR_LICENCE,
        )
    return BaseModel(
        part="MLLM",
        name=hub_id or d.name,
        hub_id=hub_id,
        revision=None,
        sha256=sha256_of(_weight_files(d)),
        licence=_hub_licence(d, hub_id, licence),
    )


def _downloaded_commit(d: Path) -> str | None:
    """The hub commit ``hf download --local-dir d`` fetched config.json from: the first line of the download
    metadata huggingface_hub keeps beside it (read here because the library's reader, ``_local_folder``, is
    private and creates lock files in the user's model directory)."""
    meta = d / ".cache" / "huggingface" / "download" / "config.json.metadata"
    if not meta.is_file():
        return None
    commit = meta.read_text().split("\n", 1)[0].strip()
    return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None


def _hub_licence(d: Path, hub_id: str | None, known: str | None = None) -> str:
    """The licence a model's own card declares (its README.md header), else the known one, else "other"."""
    card = d / "README.md"
    meta = (metadata_load(card) or {}) if card.is_file() else {}
    return str(meta.get("license") or known or KNOWN_MLLMS.get((hub_id or "").split("/")[-1], (None, "other"))[1])


def describe_sam(cfg: Config) -> BaseModel:
    """SAM of ``cfg.model.sam_checkpoint``: Meta's release (by its file name) or ppcr's tiny SAM, and a hash of
    the file (Meta publishes md5s of the releases; README "Real data and weights")."""
    m = cfg.model
    path = Path(m.sam_checkpoint)
    if m.sam_type == "tiny":
        name = f"ppcr's tiny SAM ({m.sam_checkpoint}; segment_anything's classes, ppcr-pretrain)"
    else:
        release, md5 = SAM_RELEASES[m.sam_type]
        name = (
            f"Meta's SAM {m.sam_type} ({release}, published md5 {md5})"
            if path.name == release
            else f"SAM {m.sam_type} ({path.name})"
        )
    return BaseModel(part="SAM", name=name, hub_id=None, revision=None, sha256=sha256_of([path]), licence="apache-2.0")


@dataclass
class Training:
    """What the checkpoint was trained on and for how long."""

    checkpoint: str  # the run directory and tag, as given to ppcr-export
    steps: int | None
    ranks: int | None
    sets: list[dict]  # name, split, ratio, and from the set's manifest: dataset, split_by, expressions


def describe_training(cfg: Config, run_dir: Path | None, tag: str | None) -> Training:
    """The training facts of a run's checkpoint (None for what the run directory no longer says)."""
    sets = []
    for s in cfg.data.train_sets:
        entry = {"name": s.name, "split": s.split, "ratio": s.ratio}
        manifest = Path(cfg.paths.shards_root) / s.name / "manifest.json"
        if manifest.is_file():
            data = json.loads(manifest.read_text())
            entry.update(
                dataset=data["source"]["dataset"],
                split_by=data["source"]["split_by"],
                expressions=data["splits"].get(s.split, {}).get("expressions"),
            )
        sets.append(entry)
    ranks = None
    if run_dir is not None and tag is not None:
        ranks = len(list((run_dir / "checkpoints" / tag).glob("*optim_states.pt"))) or None
    steps = int(tag.split("_")[1]) if tag and tag.startswith("step_") else None
    return Training(
        checkpoint=f"{run_dir.name}/{tag}" if run_dir is not None else "", steps=steps, ranks=ranks, sets=sets
    )


def export_licence(bases: list[BaseModel]) -> str:
    """The export's licence id: the base models' where they agree, the MLLM's where it is more restrictive
    (the weights derive from it), "other" where one is unknown."""
    ids = {b.licence for b in bases}
    if ids == {"apache-2.0"}:
        return "apache-2.0"
    if "other" in ids:
        return "other"
    return next(b.licence for b in bases if b.part == "MLLM")


def card_text(
    cfg: Config, *, bases: list[BaseModel], training: Training, results: str | None, results_from: str | None
) -> str:
    """The whole README.md: the hub's metadata header, then the card."""
    datasets = sorted({s.get("dataset", s["name"]) for s in training.sets})
    data = ModelCardData(
        license=export_licence(bases),
        base_model=[b.hub_id for b in bases if b.hub_id] or None,
        datasets=datasets,
        tags=["ppcr", "referring-image-segmentation", "image-segmentation", "segment-anything", "lora", "peft"],
        pipeline_tag="image-segmentation",
        ppcr={"base_models": [asdict(b) for b in bases], "training": asdict(training)},
    )
    m, t = cfg.model, cfg.train
    base_rows = "\n".join(
        f"| {b.part} | {b.name} | "
        + (f"revision `{b.revision}`" if b.revision else f"sha256 `{b.sha256}`")
        + f" | {LICENCES.get(b.licence, b.licence)} (`{b.licence}`) |"
        for b in bases
    )
    set_lines = "\n".join(
        f"- `{s['name']}/{s['split']}` (ratio {s['ratio']}"
        + (
            f"; {s['dataset']}, split by {s['split_by']}, {s['expressions']:,} expressions"
            if "dataset" in s and s.get("expressions") is not None
            else ""
        )
        + ")"
        for s in training.sets
    )
    ranks = training.ranks
    batch = (
        f"{t.micro_batch_size * t.grad_accum * ranks} expressions a step ({t.micro_batch_size} per rank x "
        f"{t.grad_accum} accumulation x {ranks} ranks)"
        if ranks
        else f"{t.micro_batch_size} expressions per rank x {t.grad_accum} accumulation a step"
    )
    steps = f"{training.steps:,} optimizer steps" if training.steps is not None else "an unrecorded number of steps"
    trainable = ", ".join(k for k, v in asdict(m.trainable).items() if v is True or v == "full")
    synthetic = all(s.get("dataset", s["name"]).startswith("synthetic") for s in training.sets)
    tiny = m.tiny_family is not None or m.sam_type == "tiny"
    evaluation = (
        f"`make eval` of this checkpoint ({results_from}), by generation (never teacher-forced); every "
        "figure in percent, one row per split and ablation, the full model's expression groups under "
        f"their split:\n\n{results.strip()}\n"
        if results
        else "This checkpoint has no `make eval` results yet: `make eval CKPT=<run directory>`, then export "
        "again, puts the table here.\n"
    )
    limits = [
        "- One object per expression, English expressions of the RefCOCO kind; the mask comes from one box "
        "and one semantic prompt, so an expression naming several objects gets one of them."
    ]
    if synthetic:
        limits.append(
            "- Trained on ppcr's synthetic RefCOCO-shaped scenes (coloured shapes) only: it does not "
            "segment objects in real photos."
        )
    if tiny:
        limits.append(
            "- Tiny backbones, sized for a CPU: far below the published RefCOCO numbers of PPCR-style "
            "models (README of ppcr)."
        )
    if results:
        limits.append("- The figures above hold for the splits listed; data unlike the training sets will score lower.")
    if export_licence(bases) != "apache-2.0":
        limits.append("- The weights derive from the base models: their licences (table above) govern use.")
    limits = "\n".join(limits)
    body = f"""# PPCR referring image segmentation model

Given an image and an expression such as "the small square left of the blue triangle", this model segments
the one object the expression describes. It is PPCR (Progressive Prompt-guided Cross-modal Reasoning,
arXiv 2603.27993), trained with ppcr, the PPCR training framework: a multimodal LLM with two LoRA branches first
names the target, ending in `[SEM]` whose hidden state is the semantic prompt, then locates it, ending in
`[LOC]` whose hidden state a box head turns into a box; SAM's mask decoder turns the box and the semantic
prompt into the mask.

## Base models

| part | model | revision or hash | licence |
|---|---|---|---|
{base_rows}

ppcr itself is under the Apache License 2.0.

## Training

Checkpoint `{training.checkpoint}`: {steps} of {batch}, LoRA rank {m.lora.rank} (alpha {m.lora.alpha}) on
{", ".join(m.lora.target_modules)} of both branches, learning rates {t.lr:g} (LoRA), {t.head_lr:g} (heads,
token rows), {t.sam_lr:g} (SAM), box head `{m.box_head}`, in {m.dtype}. Trained beside LoRA: {trainable or "nothing"}.
Training data:

{set_lines}

## Evaluation

{evaluation}
## Use

```python
from ppcr import Segmenter

segmenter = Segmenter.from_pretrained("path/to/this/directory")  # device="cuda", dtype="bfloat16", ...
result = segmenter("photo.jpg", "the red circle on the left")
result.mask       # (H, W) bool, at the photo's size as a viewer shows it
result.box        # the box head's box, [x1, y1, x2, y2] in pixels
result.overlay().save("overlay.png")
```

From the hub: `hf download ORG/NAME --local-dir NAME`, then `Segmenter.from_pretrained("NAME")`. On the
command line: `ppcr-infer --checkpoint NAME --image photo.jpg --expression "the red circle" --out out/`.
Install ppcr with `pip install -e .` from its repository.

Files: `config.yaml` (the run's resolved config), `mllm/` (the base MLLM with the trained rows of PPCR's tokens,
tokenizer, processor; transformers' `save_pretrained` layout), `adapters/semantic` and `adapters/spatial` (the
LoRA branches in peft's format: `PeftModel.from_pretrained(base, "adapters/semantic")`), `heads.safetensors`
(SemSP projectors and box head), `sam.safetensors` (SAM's state dict), `ppcr_export.json` (the version of this
layout, which ppcr checks at load). Every weight is in safetensors.

## Limitations

{limits}
"""
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def write_card(out: Path, cfg: Config, *, source: Path, run_dir: Path | None, tag: str | None) -> Path:
    """Write ``out/README.md`` for the model exported from ``source``: the facts from the run (``run_dir``,
    ``tag``) and its base paths; or, when ``source`` is itself an export (``run_dir`` None), from its card, or
    from its own files where it has none. The table is the latest ``make eval`` of that checkpoint."""
    if run_dir is not None:
        bases = [describe_mllm(cfg), describe_sam(cfg)]
        training = describe_training(cfg, run_dir, tag)
        eval_dir = run_dir / "eval" / tag
    else:
        previous = (metadata_load(source / "README.md") or {}).get("ppcr") if (source / "README.md").is_file() else None
        if previous:
            bases = [BaseModel(**b) for b in previous["base_models"]]
            training = Training(**previous["training"])
        else:  # an export written before exports had cards: its own files, paths relative to it
            m = replace(
                cfg.model,
                mllm_path=str(source / cfg.model.mllm_path),
                sam_checkpoint=str(source / cfg.model.sam_checkpoint),
            )
            bases = [describe_mllm(replace(cfg, model=m)), describe_sam(replace(cfg, model=m))]
            training = replace(describe_training(cfg, None, None), checkpoint=f"{source.name} (an earlier export)")
        eval_dir = source / "eval" / "saved"
    results = (eval_dir / "results.md").read_text() if (eval_dir / "results.md").is_file() else None
    text = card_text(
        cfg,
        bases=bases,
        training=training,
        results=results,
        results_from=f"{eval_dir.parent.parent.name}/eval/{eval_dir.name}/results.md",
    )
    ModelCard(text).save(out / "README.md")
    return out / "README.md"
