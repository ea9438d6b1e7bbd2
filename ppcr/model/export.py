"""``ppcr-export``: a training checkpoint (ZeRO-2/3, any number of ranks), a run (its latest checkpoint) or
an earlier export -> a self-contained directory that describes itself and loads anywhere, without DeepSpeed
and without the run: every weight in safetensors (layout in :mod:`ppcr.model.saving`) and a model card,
README.md (:mod:`ppcr.model.card`: base models with revisions or hashes and licences, data and steps, the
checkpoint's latest ``make eval`` table, how to load it, limitations). ``ppcr.Segmenter.from_pretrained``,
``ppcr-infer`` and ``ppcr-demo`` load it.

    ppcr-export --checkpoint runs/default --out exports/default
    HF_HUB_OFFLINE=0 ppcr-export --checkpoint runs/default --out exports/default --push-to-hub ORG/NAME [--private]

``--push-to-hub`` uploads the export with huggingface_hub (log in with ``hf auth login`` or set HF_TOKEN).
ppcr reaches the network only where the user opts in with ``HF_HUB_OFFLINE=0`` (ppcr/offline.py), the same
opt-in as downloads; without it the upload is refused before anything is exported.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ppcr.config import ConfigError
from ppcr.data.overlap import RECORD_FILE as EXCLUSION_RECORD
from ppcr.model.card import write_card
from ppcr.model.fingerprint import BASE_FLAG, FINGERPRINT_FILE, TRAINED_ON_FILE
from ppcr.model.saving import load_checkpoint, save_pretrained
from ppcr.offline import hub_online


class UploadRefused(ValueError):
    """--push-to-hub cannot go ahead; the message says why and what to do."""


def check_push(repo_id: str) -> None:
    """Refuse an upload before any work: a repo id the hub would not take, or a hub the user has not opted
    in to."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UploadRefused(f"--push-to-hub {repo_id!r} is not a hub repo id 'org/name' ({e})") from e
    if "/" not in repo_id:
        raise UploadRefused(f"--push-to-hub {repo_id!r}: give the owner too, 'org/name' (or 'user/name')")
    if not hub_online():
        raise UploadRefused(
            f"--push-to-hub {repo_id}: ppcr does not reach the network unless you opt in (the hub is offline by "
            "default). Set HF_HUB_OFFLINE=0 for this command, logged in with 'hf auth login' or HF_TOKEN; or upload "
            "the export yourself with 'hf upload'"
        )


def push_to_hub(folder: Path, repo_id: str, *, private: bool, message: str) -> str:
    """Create the model repo ``repo_id`` (if missing) and upload ``folder`` to it; returns the commit's URL."""
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type="model",
        commit_message=message,
        ignore_patterns=["eval/*", "eval/**"],
    )  # make eval's outputs of an export stay local
    return str(info.commit_url)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ppcr-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or earlier export")
    p.add_argument("--out", required=True, help="directory to write the export to")
    p.add_argument(
        "--push-to-hub", metavar="ORG/NAME", help="upload the export to this hub model repo (needs HF_HUB_OFFLINE=0)"
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument(
        BASE_FLAG,
        action="store_true",
        help="export even when the base weights differ from those the "
        "checkpoint was trained on (model.mllm_path, model.sam_checkpoint)",
    )
    args = p.parse_args(argv)
    if args.private and not args.push_to_hub:
        p.error("--private goes with --push-to-hub")
    try:
        if args.push_to_hub:
            check_push(args.push_to_hub)
        model, cfg, run_dir, tag = load_checkpoint(args.checkpoint, allow_base_mismatch=args.allow_base_mismatch)
    except (UploadRefused, ConfigError, FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = save_pretrained(model, cfg, args.out)
    source = run_dir / "checkpoints" / tag if run_dir is not None else Path(args.checkpoint)
    if (source / EXCLUSION_RECORD).is_file():  # which eval splits its training left out, for make eval on the export
        shutil.copyfile(source / EXCLUSION_RECORD, out / EXCLUSION_RECORD)
    trained_on = source / (FINGERPRINT_FILE if run_dir is not None else TRAINED_ON_FILE)
    if trained_on.is_file():  # the base its checkpoint trained on: model.init_from checks a new run's against it
        shutil.copyfile(trained_on, out / TRAINED_ON_FILE)
    card = write_card(out, cfg, source=Path(args.checkpoint), run_dir=run_dir, tag=tag)
    print(f"exported {args.checkpoint} ({tag or 'saved model'}) to {out}; model card {card}")
    if args.push_to_hub:
        try:
            url = push_to_hub(
                out,
                args.push_to_hub,
                private=args.private,
                message=f"ppcr-export of {Path(args.checkpoint).name} ({tag or 'saved model'})",
            )
        except Exception as e:  # noqa: BLE001 - the hub client raises its HTTP library's errors, OSError, ValueError
            first = (str(e).strip().splitlines() or [""])[0]
            print(
                f"error: could not upload {out} to the hub repo {args.push_to_hub} ({type(e).__name__}: {first}); "
                f"the export is kept: retry, or 'hf upload {args.push_to_hub} {out}'",
                file=sys.stderr,
            )
            return 1
        print(f"uploaded to https://huggingface.co/{args.push_to_hub} ({url})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
