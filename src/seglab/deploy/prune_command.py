"""`seglab prune`: flags and entry point (kept free of heavy imports; the parser is built at start)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, metavar="FILE", help="a seglab checkpoint")
    p.add_argument("--flops", type=float, default=0.3, help="fraction of FLOPs to remove, 0-1 (default: 0.3)")
    p.add_argument("--data", help="fine-tune and report data (default: the data the weights were trained on)")
    p.add_argument("--epochs", type=int, default=10, help="fine-tune epochs; 0: prune only (default: 10)")
    p.add_argument("--lr", type=float, help="fine-tune learning rate (default: the training run's / 2)")
    p.add_argument("--batch", type=int, help="fine-tune batch size (default: the training run's)")
    p.add_argument("--workers", type=int, help="DataLoader worker processes (default: the training run's)")
    p.add_argument("--global", dest="global_pruning", action="store_true",
                   help="rank channels across all layers (default: the same fraction from every layer)")  # fmt: skip
    p.add_argument("--out", help="run folder (default: runs/prune/<name>, numbered)")
    p.add_argument("--name", help="run name (default: the training run's)")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="measure size, speed and val mIoU against the original model (default: on)")  # fmt: skip
    p.add_argument("--limit", type=int, help="report: evaluate only the first N val images")
    p.add_argument("--device", default="auto", help="fine-tune on: auto, cpu, cuda or cuda:N (default: auto)")
    from seglab.cli import add_trust_flag

    add_trust_flag(p)


def run(args: argparse.Namespace) -> int:
    from seglab.deploy.prune import prune_checkpoint

    prune_checkpoint(
        args.weights,
        flops=args.flops,
        data=args.data,
        epochs=args.epochs,
        lr=args.lr,
        batch=args.batch,
        workers=args.workers,
        global_pruning=args.global_pruning,
        out=args.out,
        name=args.name,
        report=args.report,
        limit=args.limit,
        device=args.device,
        trust=args.trust_weights,
    )
    return 0
