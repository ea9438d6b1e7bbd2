"""Evaluate PPCR by generation (never teacher-forced) on every split of ``eval.sets``.

    make eval                                               # the default run's latest checkpoint
    python launch/eval.py --checkpoint runs/default         # a run directory: its latest checkpoint
    python launch/eval.py --checkpoint runs/default/checkpoints/step_00001000
    python launch/eval.py --checkpoint exported_model/      # a saved model (ppcr.model.saving)
    deepspeed --num_gpus 8 launch/eval.py --checkpoint runs/X --ablations [key.sub=value ...]
    deepspeed --num_gpus 8 launch/eval.py --checkpoint runs/X --zero3      # weights partitioned over the GPUs

Prints the table papers print (cIoU, gIoU, Prec@0.5-0.9, Box Acc@0.5, count per dataset/split; beside
them the text box's accuracy, head/text agreement, missing expressions and throughput) and writes
results.json, results.md, masks.png, prec_at_x.png (Prec@X over X, a line per split) and
predictions_<split>.jsonl (one line per expression: answers, boxes, IoUs, the mask as COCO RLE) into
<checkpoint>/eval/<tag>/.

Nothing done is lost: every split's counts are checked before the first forward; each split's
predictions, rows (split_<split>.json) and TensorBoard scalars are written as soon as it is done, and
results.json / results.md after each split; a split that fails is reported as an error line (and in
results.json) while the others are scored, and the command then exits 4. Run it again and the splits
already written with the same settings are kept, not evaluated again (--redo evaluates them again).
A split whose images the checkpoint's training did not leave out is flagged in the table and in
results.json ("excluded_from_training": false).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from PIL import Image

from ppcr.common.distributed import barrier, device, init_distributed
from ppcr.common.logger import RunLogger
from ppcr.config import ConfigError, settings_help
from ppcr.data.overlap import read_exclusion_record
from ppcr.eval.evaluate import merge_records, write_records
from ppcr.eval.report import COLUMNS, table
from ppcr.eval.rescore import PREDICTIONS_VERSION
from ppcr.eval.splits import SplitOutcome, evaluate_splits, split_name
from ppcr.eval.visualize import grid, precision_plot
from ppcr.model.fingerprint import BASE_FLAG
from ppcr.model.predict import ABLATIONS, PPCR
from ppcr.model.saving import load_checkpoint


def split_file(out: Path, name: str, kind: str) -> Path:
    """Where a split's outputs go: kind "predictions" (.jsonl, one line per expression) or "split" (.json, its
    rows and the settings they were made with)."""
    return out / (f"{kind}_{name.replace('/', '_')}" + (".jsonl" if kind == "predictions" else ".json"))


def kept_split(out: Path, name: str, settings: dict) -> list[dict] | None:
    """The rows of a split an earlier run of this command wrote with the same ``settings``, if its files are all
    there; else None (evaluate it)."""
    f = split_file(out, name, "split")
    if not (f.is_file() and split_file(out, name, "predictions").is_file()):
        return None
    try:
        done = json.loads(f.read_text())
    except ValueError:
        return None  # cut short while written: evaluate again
    return done["rows"] if done.get("settings") == settings else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="launch/eval.py",
        description=__doc__,
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, default=Path("runs/default"))
    p.add_argument(
        "--ablations",
        action="store_true",
        help="also: box from the answer text, ground-truth box "
        "(oracle), SAM with the box only and with SemSP only (one generation serves every row)",
    )
    p.add_argument("--redo", action="store_true", help="evaluate again the splits an earlier run already wrote")
    p.add_argument("--device", help="where the model runs (default: this rank's GPU, else the CPU)")
    p.add_argument("--device-map", help="'auto' spreads a large MLLM over the visible GPUs (one process only)")
    p.add_argument(
        "--zero3",
        action="store_true",
        help="partition the weights over the ranks with ZeRO-3, for a "
        "model too large for one device (every forward gathers them, so the ranks decode in lockstep) "
        "instead of every rank holding the whole model",
    )
    p.add_argument(
        BASE_FLAG,
        action="store_true",
        help="evaluate even when the base weights differ from those the "
        "checkpoint was trained on (model.mllm_path, model.sam_checkpoint)",
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "overrides", nargs="*", help="key.sub=value (eval.sets=[...], eval.batch_size=8, paths.shards_root=...)"
    )
    args = p.parse_args(argv)
    if args.device_map and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        p.error("--device-map spreads one model over the GPUs: run one process (python launch/eval.py), not ranks")
    if args.device_map and (args.device or args.zero3):
        p.error("--device-map places one whole model: not with --device or --zero3")
    if args.zero3:  # before the model is built: SAM registers the weights its prompt encoder reads directly
        import deepspeed
    try:
        model, cfg, run_dir, tag = load_checkpoint(
            args.checkpoint,
            args.overrides,
            device=None if args.device_map or args.zero3 else args.device or device(),
            device_map=args.device_map,
            allow_base_mismatch=args.allow_base_mismatch,
        )
        record = read_exclusion_record(run_dir / "checkpoints" / tag if run_dir else args.checkpoint)
    except (ConfigError, FileNotFoundError, RuntimeError, ValueError) as e:  # BaseMismatch is a RuntimeError
        print(f"error: {e}", file=sys.stderr)
        return 2
    dist = init_distributed()
    if args.zero3:  # inference only: no optimizer; DeepSpeed moves each rank's partition to its device
        ds = {
            "train_micro_batch_size_per_gpu": 1,
            "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        }
        model = deepspeed.initialize(model=model, config=ds)[0].module
    out = (run_dir or args.checkpoint) / "eval" / (tag or "saved")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    ablations = ABLATIONS if args.ablations else [PPCR]
    # what a split's rows depend on besides the weights: kept splits must have been made with the same
    settings = json.loads(
        json.dumps(
            {
                "predictions_version": PREDICTIONS_VERSION,
                "ablations": [a.name for a in ablations],
                "model": asdict(cfg.model),
                "eval": {k: v for k, v in asdict(cfg.eval).items() if k != "sets"},
                "shards_root": cfg.paths.shards_root,
            }
        )
    )
    names = [split_name(s) for s in cfg.eval.sets]
    kept = {} if args.redo else {n: rows for n in names if (rows := kept_split(out, n, settings)) is not None}
    excluded = None if record is None else set(record["excluded_eval_splits"])
    rows: dict[str, list[dict]] = dict(kept)
    errors: dict[str, str] = {}
    shown: list = []
    log = RunLogger(run_dir, dist) if run_dir is not None else None
    step = int(tag.split("_")[1]) if tag else 0
    if dist.is_main:
        print(
            f"evaluating {args.checkpoint} ({tag or 'saved model'}) by generation on {dist.world_size} rank(s), "
            f"batch {cfg.eval.batch_size}"
            + (f"; kept from an earlier run (--redo evaluates again): {', '.join(kept)}" if kept else ""),
            flush=True,
        )
    # every rank holds the whole model: no collective inside a forward, no lockstep decoding; under ZeRO-3 each
    # forward gathers the weights collectively, so the ranks agree at every decoding step
    synced = args.zero3 and dist.world_size > 1
    for split in evaluate_splits(model, cfg, dist, synced=synced, ablations=ablations, skip=frozenset(kept)):
        if split.error is not None:
            errors[split.name] = split.error
            if dist.is_main:
                print(f"error: {split.error}", file=sys.stderr, flush=True)
        else:
            for r in split.rows:
                r["excluded_from_training"] = None if excluded is None else split.name in excluded
            rows[split.name] = split.rows
            shown += split.shown
            _write_split(split, out, dist, settings=settings, log=log, step=step)
        if dist.is_main:
            _write_results(out, args=args, tag=tag, names=names, rows=rows, errors=errors, excluded=excluded)
    if log is not None:
        if shown:
            log.image(step, "eval/masks", grid(shown))
        log.close()
    if not dist.is_main:
        return 4 if errors else 0
    every = [r for n in names if n in rows for r in rows[n]]
    print(table(every))
    if shown:
        Image.fromarray(grid(shown)).save(out / "masks.png")
    precision_plot(every, out / "prec_at_x.png")
    print(f"wrote {out}/results.json, results.md, masks.png, prec_at_x.png, predictions_<split>.jsonl")
    if errors:
        print(
            f"error: {len(errors)} of {len(names)} split(s) not scored: {', '.join(errors)} (above); the others "
            "are written",
            file=sys.stderr,
        )
        return 4
    return 0


def _write_split(split: SplitOutcome, out: Path, dist, *, settings: dict, log: RunLogger | None, step: int) -> None:
    """One split's predictions (every rank's records, merged), its rows and its TensorBoard scalars, at once."""
    predictions = split_file(out, split.name, "predictions")
    write_records(split.records, predictions, dist)
    barrier()
    if dist.is_main:
        merge_records(predictions, dist.world_size)
        split_file(out, split.name, "split").write_text(
            json.dumps({"split": split.name, "settings": settings, "rows": split.rows}, indent=1)
        )
    if log is not None:
        for r in split.rows:
            group = "" if r["group"] == "all" else f"/{r['group']}"
            log.scalars(step, {k: r[k] for k in COLUMNS}, prefix=f"eval/{r['split']}/{r['ablation']}{group}")
        log.flush()


def _write_results(
    out: Path,
    *,
    args,
    tag: str | None,
    names: list[str],
    rows: dict[str, list[dict]],
    errors: dict[str, str],
    excluded: set[str] | None,
) -> None:
    """results.json and results.md with every split scored so far (rewritten after each split)."""
    every = [r for n in names if n in rows for r in rows[n]]
    not_excluded = None if excluded is None else [n for n in names if n not in excluded]
    (out / "results.json").write_text(
        json.dumps(
            {
                "checkpoint": str(args.checkpoint),
                "tag": tag,
                "rows": every,
                "errors": errors,
                "not_excluded_from_training": not_excluded,
            },
            indent=1,
        )
    )
    text = table(every) + "".join(f"\n\nerror: {e}" for e in errors.values())
    (out / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
