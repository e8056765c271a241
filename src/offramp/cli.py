"""The ``offramp`` command line. Thin: it parses flags and calls the public API."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from offramp.errors import ConfigError, OfframpError

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from offramp.jobs.demo import DemoConfig, format_results, run_demo

    cfg = DemoConfig(
        epochs=args.epochs,
        lr=args.lr,
        delta=args.delta,
        criterion=args.criterion,
        head=args.head,
        mode=args.mode,
        size=args.size,
        distill=args.distill,
        threads=args.threads,
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


def _train(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    from offramp.jobs.train import format_summary, launch, load_config, run_training

    if args.nproc < 1:
        raise ConfigError(f"--nproc must be ≥ 1, got {args.nproc}")
    cfg = load_config(args.config)  # checked here, before any rank starts
    overrides: dict[str, object] = {}
    flags: list[str] = []  # the same overrides for the ranks of a distributed run
    if args.output_dir is not None:
        overrides["output_dir"] = args.output_dir
        flags.append(f"--output-dir={args.output_dir}")
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
        flags.append(f"--epochs={args.epochs}")
    if args.quiet:
        overrides["show_progress"] = False
        flags.append("--quiet")
    cfg = dataclasses.replace(cfg, **overrides)
    if args.nproc > 1:
        code = launch(args.config, args.nproc, flags, verbose=args.verbose)
        if code != 0:
            print(
                f"offramp: error: distributed training failed (torchrun exit code {code}); "
                "the ranks' errors are above",
                file=sys.stderr,
            )
        return code
    metrics = run_training(cfg, config_path=args.config)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        print(format_summary(metrics, cfg.output_dir))
    return 0


def _place(args: argparse.Namespace) -> int:
    import dataclasses

    from offramp.jobs.place import format_placement, load_place_config, run_placement

    cfg = load_place_config(args.config)
    if args.output_dir is not None:
        cfg = dataclasses.replace(cfg, output_dir=args.output_dir)
    if args.quiet:
        cfg = dataclasses.replace(cfg, train={**cfg.train, "show_progress": False})
    print(format_placement(run_placement(cfg, config_path=args.config)))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from offramp.jobs.evaluate import evaluate_run, format_evaluation

    r = evaluate_run(args.run_dir, cost=args.cost)
    print(format_evaluation(r))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from offramp.jobs.evaluate import calibrate_run, format_calibration

    r = calibrate_run(
        args.run_dir,
        target_drop_pp=args.target_drop,
        budget=args.budget,
        confidence=args.confidence,
        cost=args.cost,
    )
    print(format_calibration(r))
    return 0


def _export(args: argparse.Namespace) -> int:
    from offramp.jobs.export import export_run, format_export

    r = export_run(
        args.run_dir,
        fmt=args.format,
        splits=_ints(args.split),
        policy=args.policy,
        codec=args.codec,
        output=args.output,
    )
    print(format_export(r))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from offramp.jobs.serve import read_token, serve_bundle

    return serve_bundle(
        args.bundle,
        tier=args.tier,
        token=read_token(args.token_file),
        segment=args.segment,
        bind=args.bind,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        allow_plaintext_remote=args.allow_plaintext_remote,
        next_tier=args.next,
        next_timeout_s=args.next_timeout,
        next_tls_root=args.next_tls_root,
        next_server_name=args.next_server_name,
        max_batch_rows=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue_rows=args.max_queue,
        max_message_bytes=int(args.max_message_mb * (1 << 20)),
        threads=args.threads,
    )


def _ints(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(v) for v in text.split(",")]
    except ValueError as exc:
        raise ConfigError(f"--split takes stage numbers separated by commas, got {text!r}") from exc


def _run_dir_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a directory written by `offramp train`")
    p.add_argument("--cost", choices=["flops", "latency"], default="flops")


def _parser() -> argparse.ArgumentParser:
    from offramp.heads import HEADS
    from offramp.jobs.demo import DemoConfig
    from offramp.policies import CRITERIA
    from offramp.runtime import MODES
    from offramp.tiers import CODECS

    p = argparse.ArgumentParser(prog="offramp", description="Multi-exit neural networks.")
    p.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    sub = p.add_subparsers(dest="command", required=True)
    d = DemoConfig()
    demo = sub.add_parser(
        "demo",
        help="train, calibrate and time a small CNN with an early exit on scikit-learn digits",
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
    demo.add_argument(
        "--size", type=int, default=d.size, help="image side the 8x8 digits are resized to"
    )
    demo.add_argument(
        "--distill",
        type=float,
        default=d.distill,
        help="share of self-distillation in the early exit's loss (0: joint training)",
    )
    demo.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="torch threads for training and timing (0: torch's default, one per core)",
    )
    demo.add_argument("--seed", type=int, default=d.seed)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    ev = sub.add_parser(
        "evaluate",
        help="per-exit accuracy, oracle, overthinking, calibration error and Pareto front of a run",
    )
    _run_dir_args(ev)
    ev.set_defaults(func=_evaluate)
    cal = sub.add_parser(
        "calibrate",
        help="calibrate every exit policy on validation for a goal and report it on test",
    )
    _run_dir_args(cal)
    goal = cal.add_mutually_exclusive_group(required=True)
    goal.add_argument(
        "--target-drop", type=float, metavar="PP", help="accuracy drop allowed, percentage points"
    )
    goal.add_argument(
        "--budget", type=float, metavar="B", help="expected cost allowed, fraction of the full"
    )
    cal.add_argument(
        "--confidence",
        type=float,
        metavar="P",
        help="with --target-drop: require it at this one-sided confidence on validation (0.95)",
    )
    cal.set_defaults(func=_calibrate)
    exp = sub.add_parser(
        "export",
        help="a calibrated run as ONNX or TorchScript tier segments, with a manifest",
    )
    exp.add_argument("run_dir", help="a directory written by `offramp train` and calibrated")
    exp.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    exp.add_argument(
        "--split",
        metavar="S[,S]",
        help="stage(s) where the next tier starts, e.g. 1 (device: stage 0; server: the rest); "
        "default: one segment",
    )
    exp.add_argument("--policy", help="a policy of analysis/calibrate.json (default: cheapest)")
    exp.add_argument("--codec", choices=sorted(CODECS), default="fp32")
    exp.add_argument("--output", metavar="DIR", help="default: RUN_DIR/export/FORMAT")
    exp.set_defaults(func=_export)
    srv = sub.add_parser(
        "serve",
        help="serve one segment of an export bundle as an edge or cloud tier (gRPC)",
    )
    srv.add_argument("bundle", help="a directory written by `offramp export --split ...`")
    srv.add_argument("--tier", choices=["edge", "cloud"], required=True)
    srv.add_argument("--segment", type=int, help="default: the last (cloud), the second (edge)")
    srv.add_argument("--bind", default="127.0.0.1:50051", help="HOST:PORT (default loopback)")
    srv.add_argument(
        "--token-file", help="file holding the shared secret (default: $OFFRAMP_TOKEN)"
    )
    srv.add_argument("--tls-cert", help="PEM certificate chain to serve TLS")
    srv.add_argument("--tls-key", help="PEM private key of the certificate")
    srv.add_argument(
        "--allow-plaintext-remote",
        action="store_true",
        help="serve plaintext on a non-loopback address (the token travels in the clear)",
    )
    srv.add_argument("--next", metavar="HOST:PORT", help="the next tier (an edge's cloud)")
    srv.add_argument("--next-timeout", type=float, default=1.0, help="seconds per forwarded call")
    srv.add_argument("--next-tls-root", help="PEM root certificate of the next tier")
    srv.add_argument("--next-server-name", help="the name the next tier's certificate is for")
    srv.add_argument("--max-batch", type=int, default=64, help="rows per batch (default 64)")
    srv.add_argument("--max-wait-ms", type=float, default=2.0, help="batching wait (default 2)")
    srv.add_argument("--max-queue", type=int, default=1024, help="rows queued at most (1024)")
    srv.add_argument("--max-message-mb", type=float, default=4.0, help="message cap (4 MiB)")
    srv.add_argument("--threads", type=int, default=1, help="compute threads (default 1)")
    srv.set_defaults(func=_serve)
    train = sub.add_parser(
        "train",
        help="train a multi-exit network as a YAML/JSON config describes (see configs/README.md)",
    )
    train.add_argument("config", help="config file (.yaml, .yml or .json)")
    train.add_argument(
        "--nproc", type=int, default=1, help="ranks to train on with DDP (torchrun); default 1"
    )
    train.add_argument("--output-dir", metavar="DIR", help="override the config's output_dir")
    train.add_argument("--epochs", type=int, help="override the config's epochs")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=_train)
    place = sub.add_parser(
        "place",
        help="where to put the exits: cost profile, candidates and every placement rule",
    )
    place.add_argument("config", help="placement config (.yaml, .yml or .json)")
    place.add_argument("--output-dir", metavar="DIR", help="override the config's output_dir")
    place.add_argument("--quiet", action="store_true", help="no progress bars")
    place.set_defaults(func=_place)
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
