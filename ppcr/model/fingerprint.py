"""What a trained model's frozen parts were: the base fingerprint a checkpoint or an export records and every
loader checks.

A checkpoint holds the trained parameters only; the vision tower, the language model's frozen weights and
SAM's image encoder come from ``model.mllm_path`` and ``model.sam_checkpoint`` at load time. Trained
parameters fit only the base they were trained on, so a changed file there (``make pretrain`` rewriting
the tiny backbones in place, a new hub commit, another SAM) would give wrong numbers without a word. Each
checkpoint therefore records (``ppcr_base.json``):

- ``mllm``: the path as configured, for a hub id its id and the hub commit it was loaded at (later loads
  ask for that commit: ``model.mllm_revision``), and the SHA-256 of every weight, config, tokenizer and
  processor file of the directory (:data:`MLLM_SUFFIXES`);
- ``sam``: the path as configured and the SHA-256 of the file.

Hashes come from :mod:`ppcr.common.hashing` (cached per file version: a 16 GB model is read once).
:func:`check_base` compares a recorded fingerprint with the files the config names now and refuses a
difference with a message that names each file, both hashes and the flag that loads it anyway; a
checkpoint written before fingerprints loads with a warning. :func:`check_model_settings` refuses a resume
whose ``model.*`` settings differ from those the checkpoint was trained with.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, replace
from pathlib import Path

from ppcr.common.hashing import file_sha256
from ppcr.config import Config, ModelConfig
from ppcr.model.mllm import check_mllm_path, download_mllm, snapshot_revision
from ppcr.model.sam import check_sam_checkpoint

FINGERPRINT_FILE = "ppcr_base.json"
CONFIG_FILE = "ppcr_config.yaml"  # the resolved config a checkpoint was written with
TRAINED_ON_FILE = "ppcr_trained_on.json"  # in an export: the fingerprint of the base its checkpoint trained on
BASE_FLAG = "--allow-base-mismatch"
BASE_FLAG_PY = "allow_base_mismatch=True"
MODEL_FLAG = "--allow-model-change"
# Files of an MLLM directory that make the model: weights, configs, tokenizer and processor, chat template.
MLLM_SUFFIXES = (".safetensors", ".json", ".jinja", ".model", ".txt", ".tiktoken")
# model.* settings a resume may change: where the base lives (its content is checked by hash), what only
# ppcr-tiny reads, how the same weights are computed or decoded, and where a run started from (read at its
# start only).
RESUME_MAY_CHANGE = (
    "mllm_path",
    "sam_checkpoint",
    "tiny_family",
    "tiny_mllm",
    "max_new_tokens",
    "attn_implementation",
    "gradient_checkpointing",
    "init_from",
)


class BaseMismatch(RuntimeError):
    """A checkpoint or export meets base weights (or model settings) other than those it was trained with."""


class UnverifiedBaseWarning(UserWarning):
    """A checkpoint or export that records no base fingerprint: loaded, unchecked."""


def mllm_files(directory: Path) -> list[Path]:
    """The files of an MLLM directory that define the model (:data:`MLLM_SUFFIXES`, top level, not hidden)."""
    return sorted(
        p for p in directory.iterdir() if p.is_file() and p.suffix in MLLM_SUFFIXES and not p.name.startswith(".")
    )


def base_fingerprint(m: ModelConfig) -> dict:
    """The fingerprint of the base weights ``m`` names now. A hub id is resolved to its local snapshot at
    ``m.mllm_revision`` (downloaded where missing, as loading it would) and its commit recorded."""
    where = check_mllm_path(m.mllm_path)
    hub_id = where if isinstance(where, str) else None
    local = download_mllm(hub_id, m.mllm_revision) if hub_id else where
    mllm = {
        "path": m.mllm_path,
        "hub_id": hub_id,
        "revision": snapshot_revision(local) if hub_id else None,
        "files": {p.name: file_sha256(p) for p in mllm_files(local)},
    }
    sam = {"path": m.sam_checkpoint, "sha256": file_sha256(check_sam_checkpoint(m))}
    return {"version": 1, "mllm": mllm, "sam": sam}


def pin_revision(m: ModelConfig, fingerprint: dict | None) -> ModelConfig:
    """``m`` with ``mllm_revision`` set to the hub commit ``fingerprint`` recorded, where ``m`` names the same
    hub id and pins none: a run's later loads ask for the commit it trained on."""
    mllm = (fingerprint or {}).get("mllm") or {}
    if m.mllm_revision is None and mllm.get("revision") and mllm.get("hub_id") == m.mllm_path:
        return replace(m, mllm_revision=mllm["revision"])
    return m


def write_fingerprint(directory: Path, fingerprint: dict, name: str = FINGERPRINT_FILE) -> Path:
    path = Path(directory) / name
    path.write_text(json.dumps(fingerprint, indent=1) + "\n")
    return path


def read_fingerprint(directory: Path, name: str = FINGERPRINT_FILE) -> dict | None:
    """The fingerprint recorded in ``directory``; None when it records none (written before fingerprints).
    A file that is there but unreadable is an error naming it."""
    path = Path(directory) / name
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data.get("mllm", {}).get("files"), dict) or not isinstance(data["sam"]["sha256"], str):
            raise ValueError("fields 'mllm.files' and 'sam.sha256' are required")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BaseMismatch(f"{path}: not a readable base fingerprint ({e}); it was damaged after it was written") from e
    return data


def base_differences(saved: dict, now: dict) -> list[str]:
    """One line per difference between two fingerprints, naming the file and both hashes."""
    out = []
    a, b = saved["mllm"], now["mllm"]
    if a.get("hub_id") and a.get("revision") != b.get("revision"):
        out.append(
            f"model.mllm_path {a['hub_id']}: hub commit {a.get('revision')} when trained, "
            f"{b.get('revision') or 'unknown'} now ({b['path']})"
        )
    root = b["hub_id"] or b["path"]
    for name in sorted(a["files"].keys() | b["files"].keys()):
        was, now_ = a["files"].get(name), b["files"].get(name)
        if was != now_:
            out.append(
                f"{Path(root) / name}: sha256 {was or '(no such file)'} when trained, {now_ or '(no such file)'} now"
            )
    if saved["sam"]["sha256"] != now["sam"]["sha256"]:
        out.append(f"{now['sam']['path']}: sha256 {saved['sam']['sha256']} when trained, {now['sam']['sha256']} now")
    return out


def check_base(saved: dict | None, m: ModelConfig, *, what: str, allow: bool) -> dict | None:
    """Compare the fingerprint ``what`` (a checkpoint or an export, for the message) recorded with the base
    files ``m`` names now. A difference raises :class:`BaseMismatch`, or with ``allow`` warns and loads on; no
    recorded fingerprint warns (:class:`UnverifiedBaseWarning`). Returns the fingerprint of the files now
    (None when nothing was recorded)."""
    if saved is None:
        warnings.warn(
            f"{what} records no fingerprint of its base weights (written before ppcr recorded them): "
            f"loaded on {m.mllm_path} and {m.sam_checkpoint} as they are now, unchecked",
            UnverifiedBaseWarning,
            stacklevel=2,
        )
        return None
    now = base_fingerprint(m)
    diffs = base_differences(saved, now)
    if diffs:
        msg = (
            f"{what} was trained on other base weights than model.mllm_path / model.sam_checkpoint hold now:\n"
            + "".join(f"  {d}\n" for d in diffs)
            + "Its trained parameters fit only the base they were trained with, so its results would be wrong. "
            "Restore those files or point model.mllm_path / model.sam_checkpoint at copies of them; or load "
            f"it anyway with {BASE_FLAG} ({BASE_FLAG_PY} in Python)"
        )
        if not allow:
            raise BaseMismatch(msg)
        warnings.warn(msg.replace("; or load it anyway with", "; loaded anyway as asked:"), stacklevel=2)
    return now


def _flat(tree: dict, prefix: str) -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_model_settings(saved: Config, cfg: Config, *, what: str, allow: bool) -> None:
    """Refuse a resume of ``what`` whose ``model.*`` settings differ from those it was saved with (except
    :data:`RESUME_MAY_CHANGE`); with ``allow`` warn and go on. The message names each key and both values."""
    keep = {f"model.{k}" for k in RESUME_MAY_CHANGE}
    a, b = _flat(asdict(saved.model), "model."), _flat(asdict(cfg.model), "model.")
    diffs = [
        f"  {k}: {a.get(k)!r} when saved, {b.get(k)!r} now\n"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k) and not any(k == x or k.startswith(f"{x}.") for x in keep)
    ]
    if not diffs:
        return
    msg = (
        f"{what} was trained with other model settings than this run's config:\n"
        + "".join(diffs)
        + "A resume continues the same model; start a new run (train.run_name=...) for other settings, or "
        f"resume anyway with {MODEL_FLAG}"
    )
    if not allow:
        raise BaseMismatch(msg)
    warnings.warn(
        msg.replace(
            "start a new run (train.run_name=...) for other settings, or resume anyway with", "resumed anyway as asked:"
        ),
        stacklevel=2,
    )
