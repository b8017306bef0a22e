"""Command line: `gainrl <command>` (also `python -m gainrl <command>`)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gainrl", description="GAIN-RL: angle-guided data selection for GRPO")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the angle ops on a random packed batch: metrics and timings")
    demo.add_argument("--batch", type=int, default=8)
    demo.add_argument("--length", type=int, default=2048)
    demo.add_argument("--dim", type=int, default=896)
    from .score import add_score_parser

    add_score_parser(sub)
    from .plots import add_plot_parser
    from .trainer import add_train_parser

    add_train_parser(sub)
    add_plot_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.batch, args.length, args.dim)
    elif args.command == "score":
        from .score import main as score_main

        return score_main(args)
    elif args.command == "train":
        from .trainer import main as train_main

        return train_main(args)
    elif args.command == "plot":
        from .plots import main as plot_main

        return plot_main(args)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The console script: :func:`main`, with bad input (ValueError, FileNotFoundError) reported as one line and
    exit status 2 instead of a traceback (``GAINRL_TRACEBACK=1`` shows it)."""
    import os

    try:
        return main(argv)
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("GAINRL_TRACEBACK"):
            raise
        print(f"gainrl: error: {e} (GAINRL_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
