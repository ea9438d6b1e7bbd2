"""The GPU check: a 7B recipe's real architecture with random weights, a few ZeRO-3 bf16 training steps
through the real launcher, and step time, samples/s, peak memory against the estimator, and MFU.

    python launch/gpu_check.py [--recipe qwen2.5-vl-7b] [--layers N] [--steps 5] [--warmup-steps 2]
                               [--nproc 1] [--peak-tflops T] [--out runs/gpu_check] [key.sub=value ...]

Writes <out>/gpu_check.md and <out>/gpu_check.json (ppcr/bench/gpu_check.py says how each figure is
measured). --layers shrinks the depth of the language model, the vision tower and SAM's image encoder
(every width kept), e.g. to try the check on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ppcr.bench import gpu_check, memory
from ppcr.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    defaults = gpu_check.Plan()
    p = argparse.ArgumentParser(
        prog="launch/gpu_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--recipe", default=defaults.recipe, choices=list(memory.RECIPES))
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="depth of the LM, vision tower and SAM encoder (default: the published depth)",
    )
    p.add_argument("--steps", type=int, default=defaults.steps, help="timed training steps")
    p.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="untimed steps before them")
    p.add_argument("--nproc", type=int, default=defaults.nproc, help="ranks (GPUs)")
    p.add_argument("--train-images", type=int, default=defaults.train_images, help="synthetic training images")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense bf16 peak TFLOP/s of one device, for MFU (known: H100, H200, A100)",
    )
    p.add_argument("--out", type=Path, default=defaults.out)
    p.add_argument("overrides", nargs="*", help="key.sub=value, applied to the run and the estimator")
    args = p.parse_args(argv)
    plan = gpu_check.Plan(
        recipe=args.recipe,
        out=args.out,
        layers=args.layers,
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        nproc=args.nproc,
        train_images=args.train_images,
        peak_flops=None if args.peak_tflops is None else args.peak_tflops * 1e12,
        overrides=args.overrides,
    )
    try:
        plan.check()
    except ValueError as e:
        p.error(str(e))
    try:
        results = gpu_check.run(plan)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the training run failed or logged other steps than asked
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(gpu_check.write(results, args.out))
    print(f"\nwrote {args.out / 'gpu_check.md'} and {args.out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
