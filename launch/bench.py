"""Benchmark the framework against its baselines on this machine: `make bench`.

    python launch/bench.py [--config RECIPE.yaml] [--out runs/bench] [--reps 5] [key.sub=value ...]

Writes <out>/results.md (the tables) and <out>/results.json (the same figures and the machine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ppcr.bench import suite
from ppcr.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="launch/bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="launch/configs/default.yaml", help="recipe YAML")
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    p.add_argument("--reps", type=int, default=suite.Plan.reps, help="repetitions of every timed figure")
    p.add_argument("overrides", nargs="*", help="key.sub=value, applied to every part")
    args = p.parse_args(argv)
    try:
        results = suite.run(args.config, args.overrides, args.out, suite.Plan(reps=args.reps))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(suite.write(results, args.out))
    print(f"\nwrote {args.out / 'results.md'} and {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
