"""The ``fastft`` command line: ``fastft info`` (more subcommands arrive with the trainer and the bench suite).

Errors in what the user typed end with exit code 2 and one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys


class UsageError(Exception):
    """A bad argument or input: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        raise UsageError(message)


def _cmd_info(args) -> int:
    from .info import collect, render

    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastft", description="fastft: fused kernels for fine-tuning Hugging Face causal LMs")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    info = sub.add_parser("info", help="versions, devices, and which backend runs each op here and why")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(func=_cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            raise UsageError("a command is required: fastft info  (see fastft --help)")
        return args.func(args)
    except UsageError as exc:
        print(f"fastft: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"fastft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
