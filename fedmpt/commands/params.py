"""``fedmpt params``: trainable parameter counts of a method on a backbone (random weights are fine)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("params", help="count trainable parameters of a method", description=__doc__)
    p.add_argument("--method", default="fedmpt")
    p.add_argument("--backbone", default="fedmpt-tiny-clip", help="open_clip model name (built with random weights)")
    p.add_argument("--dataset", default="synthetic", help="a dataset with shipped default conditions")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedmpt.backbone.loader import load_backbone
    from fedmpt.conditions import load_conditions
    from fedmpt.methods import build_method

    cset = load_conditions(args.dataset)
    backbone = load_backbone(args.backbone, random_init=True)
    method = build_method(args.method, backbone, cset.classnames, cset.conditions)
    total = 0
    for name, p in method.trainable_parameters().items():
        print(f"{name:40s} {tuple(p.shape)!s:>20s} {p.numel():>10,d}")
        total += p.numel()
    print(
        f"{args.method} on {args.backbone} ({len(cset.classnames)} classes, {len(cset.conditions)} conditions): "
        f"{total:,d} trainable parameters ({total / 1e6:.2f}M)"
    )
    return 0
