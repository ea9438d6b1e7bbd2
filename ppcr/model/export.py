"""``ppcr-export``: a training checkpoint (ZeRO-2/3, any number of ranks) or run -> a self-contained
directory that loads without DeepSpeed (layout in :mod:`ppcr.model.saving`), and optionally a plain
transformers model with one LoRA branch merged in.

    ppcr-export --checkpoint runs/default --out exports/default
    ppcr-export --checkpoint runs/default --out exports/default --merge-into exports/default-semantic --branch semantic
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ppcr.config import ConfigError
from ppcr.model.lora import BRANCHES, use_branch
from ppcr.model.model import PPCRModel
from ppcr.model.saving import load_checkpoint, save_pretrained, token_rows_into


def merge_branch(model: PPCRModel, branch: str, out: str | Path) -> Path:
    """Save the base MLLM with one LoRA branch merged (a plain transformers model). Consumes the
    in-memory model's adapters: call it last."""
    use_branch(model.mllm, branch)
    merged = model.mllm.merge_and_unload(adapter_names=[branch])
    merged.load_state_dict(token_rows_into(merged.state_dict(), model))
    out = Path(out)
    merged.save_pretrained(out)
    model.processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ppcr-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or saved model")
    p.add_argument("--out", required=True, help="directory to write the export to")
    p.add_argument("--merge-into", help="also write the base MLLM with --branch merged, as a plain transformers model")
    p.add_argument("--branch", choices=BRANCHES, default="semantic")
    args = p.parse_args(argv)
    try:
        model, cfg, _, tag = load_checkpoint(args.checkpoint)
    except (ConfigError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = save_pretrained(model, cfg, args.out)
    print(f"exported {args.checkpoint} ({tag or 'saved model'}) to {out}")
    if args.merge_into:
        print(f"wrote {merge_branch(model, args.branch, args.merge_into)} (base with the {args.branch} branch merged)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
