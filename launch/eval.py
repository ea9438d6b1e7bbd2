"""Evaluate PPCR by generation (never teacher-forced) on every split of ``eval.sets``.

    make eval                                               # the default run's latest checkpoint
    python launch/eval.py --checkpoint runs/default         # a run directory: its latest checkpoint
    python launch/eval.py --checkpoint runs/default/checkpoints/step_00001000
    python launch/eval.py --checkpoint exported_model/      # a saved model (ppcr.model.saving)
    deepspeed --num_gpus 8 launch/eval.py --checkpoint runs/X --ablations [key.sub=value ...]

Prints the table papers print (cIoU, gIoU, Prec@0.5-0.9, Box Acc@0.5, count per dataset/split) and
writes results.json, results.md and masks.png into <checkpoint>/eval/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from ppcr.config import ConfigError
from ppcr.eval.evaluate import ABLATIONS, Ablation, evaluate_items, filler_item, split_items
from ppcr.eval.metrics import THRESHOLDS
from ppcr.eval.visualize import grid
from ppcr.model.saving import load_checkpoint
from ppcr.common.distributed import device, init_distributed
from ppcr.common.logger import RunLogger

COLUMNS = ["cIoU", "gIoU", *[f"Prec@{t}" for t in THRESHOLDS], "BoxAcc@0.5", "TextBoxAcc@0.5", "Agreement", "count"]


def table(rows: list[dict]) -> str:
    """Markdown; every metric in percent, as papers report them."""
    head = f"| {'dataset/split':<28} | {'ablation':<24} | " + " | ".join(f"{c:>10}" for c in COLUMNS) + " |"
    lines = [head, "|" + "|".join(["---"] * (len(COLUMNS) + 2)) + "|"]
    for r in rows:
        vals = [f"{100 * r[c]:10.2f}" if c != "count" else f"{r[c]:10d}" for c in COLUMNS]
        lines.append(f"| {r['split']:<28} | {r['ablation']:<24} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launch/eval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("runs/default"))
    p.add_argument("--ablations", action="store_true", help="also: box from the answer text, ground-truth box "
                   "(oracle), SAM with the box only and with SemSP only")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key.sub=value (eval.sets=[...], paths.shards_root=...)")
    args = p.parse_args(argv)
    try:
        model, cfg, run_dir, tag = load_checkpoint(args.checkpoint, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dist = init_distributed()
    model = model.to(device())
    synced = False  # every rank holds the whole model: no collective inside a forward
    ablations = ABLATIONS if args.ablations else [Ablation()]
    rows, shown = [], []
    for spec in cfg.eval.sets:
        items = split_items(cfg, spec, dist, limit=cfg.eval.max_expressions)
        filler = filler_item(cfg, spec)
        for ab in ablations:
            result, kept = evaluate_items(model, items, filler, dist, synced, ab, keep=2 if ab == Ablation() else 0)
            rows.append({"split": f"{spec.name}/{spec.split}", "ablation": ab.name, **result})
            shown += kept
    if dist.is_main:
        out = (run_dir or args.checkpoint) / "eval" / (tag or "saved")
        out.mkdir(parents=True, exist_ok=True)
        text = table(rows)
        print(f"evaluated {args.checkpoint} ({tag or 'saved model'}) by generation on {dist.world_size} rank(s)")
        print(text)
        (out / "results.json").write_text(json.dumps({"checkpoint": str(args.checkpoint), "tag": tag, "rows": rows},
                                                     indent=1))
        (out / "results.md").write_text(text + "\n")
        if shown:
            image = grid(shown)
            Image.fromarray(image).save(out / "masks.png")
        print(f"wrote {out}/results.json, results.md, masks.png")
        if run_dir is not None:
            log = RunLogger(run_dir, dist)
            step = int(tag.split("_")[1])
            for r in rows:
                log.scalars(step, {k: r[k] for k in COLUMNS}, prefix=f"eval/{r['split']}/{r['ablation']}")
            if shown:
                log.image(step, "eval/masks", image)
            log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
