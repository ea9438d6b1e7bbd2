"""Evaluate PPCR by generation (never teacher-forced) on every split of ``eval.sets``.

    make eval                                               # the default run's latest checkpoint
    python launch/eval.py --checkpoint runs/default         # a run directory: its latest checkpoint
    python launch/eval.py --checkpoint runs/default/checkpoints/step_00001000
    python launch/eval.py --checkpoint exported_model/      # a saved model (ppcr.model.saving)
    deepspeed --num_gpus 8 launch/eval.py --checkpoint runs/X --ablations [key.sub=value ...]

Prints the table papers print (cIoU, gIoU, Prec@0.5-0.9, Box Acc@0.5, count per dataset/split; beside
them the text box's accuracy, head/text agreement, missing expressions and throughput) and writes
results.json, results.md, masks.png, prec_at_x.png (Prec@X over X, a line per split) and
predictions_<split>.jsonl (one line per expression: answers, boxes, IoUs, the mask as COCO RLE) into
<checkpoint>/eval/<tag>/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from ppcr.common.distributed import barrier, device, init_distributed
from ppcr.common.logger import RunLogger
from ppcr.config import ConfigError, settings_help
from ppcr.eval.evaluate import merge_records, write_records
from ppcr.eval.report import COLUMNS, table
from ppcr.eval.splits import MissingExpressions, evaluate_splits
from ppcr.eval.visualize import grid, precision_plot
from ppcr.model.fingerprint import BASE_FLAG, BaseMismatch
from ppcr.model.predict import ABLATIONS, PPCR
from ppcr.model.saving import load_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launch/eval.py", description=__doc__, epilog=settings_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("runs/default"))
    p.add_argument("--ablations", action="store_true", help="also: box from the answer text, ground-truth box "
                   "(oracle), SAM with the box only and with SemSP only (one generation serves every row)")
    p.add_argument(BASE_FLAG, action="store_true", help="evaluate even when the base weights differ from those the "
                   "checkpoint was trained on (model.mllm_path, model.sam_checkpoint)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key.sub=value (eval.sets=[...], eval.batch_size=8, paths.shards_root=...)")
    args = p.parse_args(argv)
    try:
        model, cfg, run_dir, tag = load_checkpoint(args.checkpoint, args.overrides,
                                                   allow_base_mismatch=args.allow_base_mismatch)
    except (ConfigError, FileNotFoundError, BaseMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dist = init_distributed()
    model = model.to(device())
    out = (run_dir or args.checkpoint) / "eval" / (tag or "saved")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    try:
        # every rank holds the whole model: no collective inside a forward, so no lockstep decoding
        run = evaluate_splits(model, cfg, dist, synced=False, ablations=ABLATIONS if args.ablations else [PPCR])
    except MissingExpressions as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    barrier()
    files = {split: out / f"predictions_{split.replace('/', '_')}.jsonl" for split in run.records}
    for split, records in run.records.items():
        write_records(records, files[split], dist)
    barrier()
    if not dist.is_main:
        return 0
    for path in files.values():
        merge_records(path, dist.world_size)
    text = table(run.rows)
    print(f"evaluated {args.checkpoint} ({tag or 'saved model'}) by generation on {dist.world_size} rank(s), "
          f"batch {cfg.eval.batch_size}")
    print(text)
    (out / "results.json").write_text(json.dumps({"checkpoint": str(args.checkpoint), "tag": tag, "rows": run.rows},
                                                 indent=1))
    (out / "results.md").write_text(text + "\n")
    if run.shown:
        Image.fromarray(grid(run.shown)).save(out / "masks.png")
    precision_plot(run.rows, out / "prec_at_x.png")
    print(f"wrote {out}/results.json, results.md, masks.png, prec_at_x.png, predictions_<split>.jsonl")
    if run_dir is not None:
        log = RunLogger(run_dir, dist)
        step = int(tag.split("_")[1])
        for r in run.rows:
            group = "" if r["group"] == "all" else f"/{r['group']}"
            log.scalars(step, {k: r[k] for k in COLUMNS}, prefix=f"eval/{r['split']}/{r['ablation']}{group}")
        if run.shown:
            log.image(step, "eval/masks", grid(run.shown))
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
