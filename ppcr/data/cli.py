"""``ppcr-shards``: make the synthetic dataset, build shard sets from REFER files, check and show them.

    ppcr-shards synth  [--config R.yaml] [key=value ...]
    ppcr-shards build  --refer-root DIR --dataset refcoco --split-by unc --images DIR --out DIR
    ppcr-shards verify DIR [--quick]
    ppcr-shards show   DIR [--split val] [-n 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ppcr.config import ConfigError, DataConfig, load_config
from ppcr.data import synthetic
from ppcr.data.refer import DATASET_SPLITS
from ppcr.data.shards import RejectShareExceeded, build_shards, decode_sample, iter_tar_samples, load_manifest, verify_shards


def _synth(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    t0 = time.time()
    counts = synthetic.generate(cfg.data.synthetic, cfg.paths.refer_root, cfg.paths.images_root, workers=args.workers)
    secs = time.time() - t0
    for split, c in counts.items():
        print(f"{split:>6}: {c['images']:5d} images {c['refs']:6d} refs {c['sentences']:6d} expressions")
    n = sum(c["images"] for c in counts.values())
    print(f"wrote {Path(cfg.paths.refer_root) / synthetic.DATASET} and {n} images under "
          f"{Path(cfg.paths.images_root) / synthetic.DATASET} in {secs:.1f}s")
    return 0


def _build(args: argparse.Namespace) -> int:
    t0 = time.time()
    try:
        manifest = build_shards(args.refer_root, args.dataset, args.split_by, args.images, args.out,
                                splits=args.splits, workers=args.workers, max_samples=args.max_samples,
                                max_mb=args.max_mb, max_reject_share=args.max_reject_share)
        failed = None
    except RejectShareExceeded as e:
        manifest, failed = load_manifest(args.out), str(e)
    secs = time.time() - t0
    refs = sum(s["samples"] for s in manifest["splits"].values())
    for split, s in manifest["splits"].items():
        print(f"{split:>6}: {s['samples']:6d} refs {s['expressions']:6d} expressions "
              f"{len(s['shards']):4d} shards {s['bytes'] / 2**20:8.1f} MiB")
    rej = manifest["rejected"]
    print(f"rejected {rej['count']} refs {json.dumps(rej['reasons'])}; details in {Path(args.out) / rej['file']}")
    print(f"built {args.out} in {secs:.1f}s ({refs / max(secs, 1e-9):.0f} refs/s)")
    if failed:
        print(f"error: {failed}", file=sys.stderr)
        return 1
    return 0


def _verify(args: argparse.Namespace) -> int:
    problems, counts = verify_shards(args.dir, deep=not args.quick)
    for p in problems:
        print(p)
    what = f"{counts['shards']} shards" + ("" if args.quick else f", {counts['samples']} samples, "
                                                              f"{counts['expressions']} expressions")
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {what}", file=sys.stderr)
        return 1
    print(f"OK: {what} match {Path(args.dir) / 'manifest.json'}")
    return 0


def _show(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.dir)
    split = args.split or next(iter(manifest["splits"]))
    shown = 0
    for shard in manifest["splits"][split]["shards"]:
        for raw in iter_tar_samples(Path(args.dir) / shard["name"]):
            s = decode_sample(raw)
            m = s["meta"]
            print(f"{s['key']}  ({shard['name']})")
            print(f"  image {m['width']}x{m['height']}  category {m['category']} ({m['category_id']})  "
                  f"bbox {[round(v, 1) for v in m['bbox']]}  mask area {int(s['mask'].sum())}")
            for sent, group in zip(m["sentences"], m["groups"]):
                print(f"  - {sent}  [{group}]")
            shown += 1
            if shown >= args.n:
                return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    d = DataConfig()
    p = argparse.ArgumentParser(prog="ppcr-shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("synth", help="write the synthetic dataset as REFER files and JPEGs (paths.* of the config)")
    s.add_argument("--config", help="recipe YAML (default: the built-in defaults)")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("overrides", nargs="*", help="key.sub=value")
    s.set_defaults(fn=_synth)

    b = sub.add_parser("build", help="convert a REFER dataset into a WebDataset shard set")
    b.add_argument("--refer-root", required=True, help="directory holding <dataset>/refs(<split-by>).p and instances.json")
    b.add_argument("--dataset", required=True, choices=sorted({k[0] for k in DATASET_SPLITS}))
    b.add_argument("--split-by", required=True, choices=sorted({k[1] for k in DATASET_SPLITS}))
    b.add_argument("--images", required=True, help="directory of the images (COCO train2014 for RefCOCO*)")
    b.add_argument("--out", required=True, help="output shard set directory, e.g. shards/refcoco_unc")
    b.add_argument("--splits", nargs="+", help="only these splits (default: all)")
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--max-samples", type=int, default=d.shard_max_samples, help="samples per shard")
    b.add_argument("--max-mb", type=float, default=d.shard_max_mb, help="MiB per shard")
    b.add_argument("--max-reject-share", type=float, default=d.max_reject_share,
                   help="exit non-zero when a larger share of refs is rejected")
    b.set_defaults(fn=_build)

    v = sub.add_parser("verify", help="check a shard set against its manifest (sizes, sha256, every sample)")
    v.add_argument("dir")
    v.add_argument("--quick", action="store_true", help="sizes and checksums only, no decoding")
    v.set_defaults(fn=_verify)

    w = sub.add_parser("show", help="print a few decoded samples")
    w.add_argument("dir")
    w.add_argument("--split")
    w.add_argument("-n", type=int, default=3)
    w.set_defaults(fn=_show)

    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
