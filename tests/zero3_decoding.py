"""Decode a checkpoint's first eval split with its weights partitioned by ZeRO-3 over the launcher's ranks,
every rank in lockstep (``synced``), and write each rank's per-expression records: what
tests/test_eval.py compares with one process decoding the whole model.

    deepspeed --num_gpus 2 tests/zero3_decoding.py --checkpoint RUN --out DIR --limit N --batch-size B
"""

import argparse
import json
from pathlib import Path

import deepspeed

from ppcr.common.distributed import init_distributed
from ppcr.eval.evaluate import evaluate_batches, filler_item, groups_of, split_batches
from ppcr.model.saving import load_checkpoint


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--limit", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--local_rank", type=int)
    args = p.parse_args()
    dist = init_distributed()
    model, cfg, _, _ = load_checkpoint(args.checkpoint)  # deepspeed is imported: SAM's prompt weights registered
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in engine.module.parameters())
    spec = cfg.eval.sets[0]
    batches = split_batches(cfg, spec, dist, batch_size=args.batch_size, limit=args.limit)
    result = evaluate_batches(engine.module, batches, filler=filler_item(cfg, spec), dist=dist, synced=True,
                              groups=groups_of(cfg, spec), records=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{dist.rank}.json").write_text(json.dumps({"partitioned": partitioned,
                                                                 "records": result.records}))


if __name__ == "__main__":
    main()
