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

from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from PIL import Image

from ppcr.config import Config, ConfigError, load_config
from ppcr.eval.evaluate import ABLATIONS, Ablation, evaluate_items, filler_item, split_items
from ppcr.eval.metrics import THRESHOLDS
from ppcr.model.model import PPCRModel
from ppcr.model.saving import load_pretrained
from ppcr.train.checkpoint import latest_tag
from ppcr.train.distributed import device, init_distributed
from ppcr.train.logger import RunLogger
from ppcr.train.validate import grid

COLUMNS = ["cIoU", "gIoU", *[f"Prec@{t}" for t in THRESHOLDS], "BoxAcc@0.5", "count"]


def resolve(path: Path) -> tuple[str, Path, Path | None, str | None]:
    """(kind, config file, run dir, checkpoint tag) of what --checkpoint names."""
    if (path / "heads.safetensors").is_file():
        return "saved", path / "config.yaml", None, None
    if (path / "checkpoints").is_dir():
        tag = latest_tag(path / "checkpoints")
        if tag is None:
            raise FileNotFoundError(f"{path}/checkpoints has no complete checkpoint yet (no 'latest')")
        return "run", path / "config.yaml", path, tag
    if path.name.startswith("step_") and (path.parent.parent / "config.yaml").is_file():
        return "run", path.parent.parent / "config.yaml", path.parent.parent, path.name
    raise FileNotFoundError(f"--checkpoint {path}: neither a run directory, a checkpoint directory nor a saved model")


def load_model(kind: str, path: Path, cfg: Config, run_dir: Path | None, tag: str | None) -> PPCRModel:
    """The model in eval mode on this rank's device. A DeepSpeed checkpoint is consolidated with
    DeepSpeed's own zero_to_fp32 (any number of saving ranks, ZeRO-2 or 3), so evaluation needs
    neither the training world size nor DeepSpeed's engine, and ranks never wait on each other."""
    if kind == "saved":
        model, _ = load_pretrained(path)
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag)
        model = PPCRModel.from_config(cfg.model, cfg.train.loss)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise RuntimeError(f"checkpoint {run_dir}/checkpoints/{tag} does not fit the model: missing "
                               f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    return model.to(device()).eval()


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
        kind, config_file, run_dir, tag = resolve(args.checkpoint)
        cfg = load_config(config_file, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dist = init_distributed()
    model = load_model(kind, args.checkpoint, cfg, run_dir, tag)
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
        out = (args.checkpoint if kind == "saved" else run_dir) / "eval" / (tag or "saved")
        out.mkdir(parents=True, exist_ok=True)
        text = table(rows)
        print(f"evaluated {args.checkpoint} ({tag or 'saved model'}) by generation on {dist.world_size} rank(s)")
        print(text)
        (out / "results.json").write_text(json.dumps({"checkpoint": str(args.checkpoint), "tag": tag, "rows": rows},
                                                     indent=1))
        (out / "results.md").write_text(text + "\n")
        if shown:
            image = grid(shown, model.preprocess)
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
