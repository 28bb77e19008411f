"""The `jaxalign` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxalign", description="Align causal LMs with JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    from jaxalign import bench

    bench.add_arguments(sub.add_parser("bench", help="throughput benchmarks (tokens/s, MFU, memory)"))
    args = parser.parse_args(argv)
    try:
        if args.command == "bench":
            bench.run(args)
    except Exception as e:  # user-facing errors: one line, no traceback
        from jaxalign.errors import JaxalignError

        if isinstance(e, JaxalignError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
