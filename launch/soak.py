"""Soak a recipe: a long run through the real launcher, with periodic checkpoints and validation,
then the check that host memory stays flat and step time does not grow: `make soak`.

    python launch/soak.py [--config RECIPE.yaml] [--nproc 2] [--steps 4000] [key.sub=value ...]

The run goes to <paths.runs_root>/soak (started afresh); the verdict and its table to soak.md and
soak.json there. Exits non-zero when memory or step time grows past the limits (ppcr.bench.soak).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ppcr.bench import soak
from ppcr.bench.training import run_launcher
from ppcr.config import ConfigError, load_config
from ppcr.train.preflight import resolve_batch

# Periodic checkpoints and validation, as a long real run has them.
SOAK = [
    "train.run_name=soak",
    "train.save_every=250",
    "train.keep_last=2",
    "train.val_every=500",
    "train.val_samples=24",
    "train.image_every=500",
    "train.log_every=25",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="launch/soak.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="launch/configs/default.yaml", help="recipe YAML")
    p.add_argument("--nproc", type=int, default=2, help="ranks on this machine")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("overrides", nargs="*", help="key.sub=value, after the soak's own")
    args = p.parse_args(argv)
    overrides = [*SOAK, f"train.max_steps={args.steps}", *args.overrides]
    try:
        cfg = load_config(args.config, overrides)
        resolve_batch(cfg, args.nproc)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(cfg.paths.runs_root) / cfg.train.run_name
    done = run_launcher(args.config, overrides, args.nproc, run_dir, capture=False)  # from its start
    if done.returncode != 0:
        print(f"error: the soak run failed (exit {done.returncode}); see {run_dir}", file=sys.stderr)
        return done.returncode
    samples_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * args.nproc
    result = soak.analyse(soak.read_run(run_dir), samples_per_step)
    text = soak.report(result)
    (run_dir / "soak.md").write_text(text + "\n")
    (run_dir / "soak.json").write_text(json.dumps(result, indent=1))
    print(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
