"""The ``offramp`` command line. Thin: it parses flags and calls the public API."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from offramp.errors import OfframpError

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from offramp.demo import DemoConfig, format_results, run_demo

    cfg = DemoConfig(
        epochs=args.epochs,
        lr=args.lr,
        delta=args.delta,
        criterion=args.criterion,
        head=args.head,
        mode=args.mode,
        seed=args.seed,
        show_progress=not args.quiet,
    )
    result = run_demo(cfg, json_path=args.json, plot_path=args.plot)
    print(format_results(result))
    if args.json:
        print(f"\nresults written to {args.json}")
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def _parser() -> argparse.ArgumentParser:
    from offramp.demo import DemoConfig
    from offramp.heads import HEADS
    from offramp.policies import CRITERIA
    from offramp.runtime import MODES

    p = argparse.ArgumentParser(prog="offramp", description="Multi-exit neural networks.")
    p.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    sub = p.add_subparsers(dest="command", required=True)
    d = DemoConfig()
    demo = sub.add_parser(
        "demo",
        help="train, calibrate and time B-LeNet with early exits on scikit-learn digits",
    )
    demo.add_argument("--json", metavar="PATH", help="write results as JSON")
    demo.add_argument("--plot", metavar="PATH", help="write the accuracy-cost plot (PNG)")
    demo.add_argument("--epochs", type=int, default=d.epochs)
    demo.add_argument("--lr", type=float, default=d.lr)
    demo.add_argument(
        "--delta", type=float, default=d.delta, help="accuracy loss allowed at calibration"
    )
    demo.add_argument("--criterion", choices=sorted(CRITERIA), default=d.criterion)
    demo.add_argument("--head", choices=sorted(HEADS), default=d.head)
    demo.add_argument("--mode", choices=MODES, default=d.mode)
    demo.add_argument("--seed", type=int, default=d.seed)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``offramp`` command."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    try:
        return int(args.func(args))
    except OfframpError as exc:
        print(f"offramp: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
