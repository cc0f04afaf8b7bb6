"""The `switchboard` command line."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_backbone(args: argparse.Namespace) -> int:
    from server.backbone import load_backbone

    print(json.dumps(load_backbone(args.model).spec.as_dict(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchboard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    backbone = sub.add_parser("backbone", help="load the backbone and print its description and fingerprint")
    backbone.add_argument("--model", default=None, help="local model directory (default: embedded MiniLM)")
    backbone.set_defaults(func=_cmd_backbone)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
