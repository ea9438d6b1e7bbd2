"""Train PPCR.

    deepspeed [--num_gpus G | --hostfile H] launch/train.py --config RECIPE.yaml [key.sub=value ...]
    torchrun --nproc_per_node G launch/train.py --config RECIPE.yaml [...]
    srun python launch/train.py --config RECIPE.yaml [...]        (ranks from SLURM variables)
    python launch/train.py --config RECIPE.yaml [...]             (one process)

Re-running the same command resumes from the run's latest complete checkpoint, on the base weights it
was trained on (their fingerprint is in every checkpoint) and with the same model settings; a difference
is refused, naming it (--allow-base-mismatch, --allow-model-change resume anyway).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import deepspeed
import torch
from transformers.integrations import HfDeepSpeedConfig

from ppcr.common.checkpoint_paths import latest_tag
from ppcr.common.distributed import init_distributed
from ppcr.common.logger import RunLogger
from ppcr.config import ConfigError, dump_config, load_config, settings_help
from ppcr.data.stream import build_train_loader
from ppcr.eval.validate import Validator
from ppcr.model.fingerprint import BASE_FLAG, MODEL_FLAG, BaseMismatch
from ppcr.model.model import PPCRModel
from ppcr.model.params import parameter_table
from ppcr.model.saving import trained_state
from ppcr.train import checkpoint
from ppcr.train.ds_config import zero_stage
from ppcr.train.init_from import init_trained
from ppcr.train.loop import train
from ppcr.train.nonfinite import NonfiniteLossError
from ppcr.train.offload import CpuAdamUnavailable, load_cpu_adam, offloads_optimizer
from ppcr.train.optim import build_optimizer, build_scheduler
from ppcr.train.preflight import check_run_inputs, run_identity
from ppcr.train.rng import seed_rank

RECIPES = Path(__file__).parent / "configs"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    recipes = "\n".join(f"  {p}" for p in sorted(RECIPES.glob("*.yaml")))
    p = argparse.ArgumentParser(
        prog="launch/train.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog=f"recipes:\n{recipes}\n\noverrides: key.sub=value, values in YAML, e.g.\n"
        "  train.max_steps=200 data.num_workers=0 'data.train_sets=[{name: refcoco_unc, split: train}]'\n\n"
        + settings_help(),
    )
    p.add_argument("--config", required=True, help="recipe YAML")
    p.add_argument(
        BASE_FLAG,
        action="store_true",
        help="resume even when the base weights (model.mllm_path, "
        "model.sam_checkpoint) differ from those the checkpoint was trained on",
    )
    p.add_argument(
        MODEL_FLAG,
        action="store_true",
        help="resume even when model.* settings differ from those the checkpoint was trained with",
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dist = init_distributed()
    print(f"rank {dist.rank}/{dist.world_size} node {dist.node_rank} local rank {dist.local_rank}", flush=True)
    run_dir = Path(cfg.paths.runs_root) / cfg.train.run_name
    try:
        ds = check_run_inputs(cfg, dist.world_size, run_dir)  # before anything heavy
        identity = run_identity(cfg, run_dir, allow_base=args.allow_base_mismatch, allow_model=args.allow_model_change)
    except (ConfigError, BaseMismatch) as e:
        if dist.is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = identity.config  # the hub commit pinned
    ckpt_dir = run_dir / "checkpoints"
    start_from = None  # model.init_from's trained weights, for a run that has no checkpoint yet
    if cfg.model.init_from and latest_tag(ckpt_dir) is None:
        try:
            start_from = trained_state(cfg.model.init_from, cfg.model, allow_base_mismatch=args.allow_base_mismatch)
        except (BaseMismatch, FileNotFoundError, RuntimeError, ValueError) as e:
            if dist.is_main:
                print(f"error: model.init_from: {e}", file=sys.stderr)
            return 2
    if offloads_optimizer(ds):  # its C++ op, built on first use: before the model, so that a failure is quick
        try:
            load_cpu_adam(ds_config=cfg.train.ds_config, announce=dist.is_main)
        except CpuAdamUnavailable as e:
            if dist.is_main:
                print(f"error: {e}", file=sys.stderr)
            return 2
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        print(f"run directory: {run_dir.resolve()}  (world size {dist.world_size}, ZeRO-{zero_stage(ds)})", flush=True)
    # Under ZeRO-3 the MLLM is built partitioned (zero.Init): no rank holds the whole model.
    hf_ds = HfDeepSpeedConfig(ds) if zero_stage(ds) == 3 else None  # noqa: F841 (kept alive on purpose)
    model = PPCRModel.from_config(cfg.model, cfg.train.loss)
    if start_from is not None:
        state, complete = start_from
        kept = init_trained(model, state, complete=complete, where=cfg.model.init_from)
        del state, start_from
        if dist.is_main:
            print(
                f"started from the trained weights of {cfg.model.init_from}"
                + (
                    f"; {len(kept)} trainable parameter(s) it did not train keep the base's, first {kept[:3]}"
                    if kept
                    else ""
                ),
                flush=True,
            )
    if dist.is_main:
        print(parameter_table(model), flush=True)
    optimizer = build_optimizer(model, cfg.train, ds=ds)
    if checkpoint.prepare_elastic(ckpt_dir, dist):  # written by another number of ranks: DeepSpeed's universal load
        ds = {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=build_scheduler(optimizer, cfg.train), config=ds
    )
    if dist.is_main:
        print(
            f"optimizer: {type(optimizer).__name__}, groups "
            + ", ".join(g.get("name", "?") for g in optimizer.param_groups),
            flush=True,
        )
    seed_rank(cfg.train.seed, dist.rank)  # dropout differs between ranks (a resume restores the states next)
    loader = build_train_loader(cfg, dist.rank, dist.world_size)
    start = checkpoint.resume(engine, ckpt_dir, loader, dist, seed=cfg.train.seed)
    if dist.is_main and start:
        print(
            f"resumed from step {start}"
            + (" (model.init_from applies to a run's start only: ignored)" if cfg.model.init_from else ""),
            flush=True,
        )
    # Generation runs a varying number of forwards; under ZeRO-3, whose forwards gather parameters
    # collectively, every rank decodes the same number of steps.
    synced = zero_stage(ds) == 3 and dist.world_size > 1
    validator = Validator(cfg, dist, synced=synced) if cfg.train.val_samples and cfg.eval.sets else None
    log = RunLogger(run_dir, dist)
    try:
        status, step, totals = train(
            cfg,
            dist,
            engine,
            loader,
            run_dir=run_dir,
            start_step=start,
            log=log,
            identity=identity.files(),
            validator=validator,
        )
    except NonfiniteLossError as e:
        if dist.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    finally:
        log.close()
    if dist.is_main:
        summary = "; ".join(f"{k}: {v}" for k, v in totals.items())
        print(f"{status} at step {step}; {summary}; run directory: {run_dir.resolve()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
