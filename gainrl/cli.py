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
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.batch, args.length, args.dim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
