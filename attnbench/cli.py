"""Command line: ``python -m attnbench list``."""

from __future__ import annotations

import argparse
import sys

import attentions


def _list(args: argparse.Namespace) -> int:
    descriptions = attentions.available()
    width = max(map(len, descriptions), default=0)
    for name, description in descriptions.items():
        print(f"{name:<{width}}  {description}")
        if args.options:
            for option, default in attentions.options(name).items():
                print(f"{'':<{width}}    {option} = {default!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m attnbench",
        description="Benchmark and reproduction suite for sparse vision attention.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    list_parser = commands.add_parser(
        "list", help="list the registered attention mechanisms", description="List the registered attention "
        "mechanisms (built-in and plug-ins of the 'attnbench.attentions' entry-point group)."
    )
    list_parser.add_argument("--options", action="store_true", help="also print each mechanism's options")
    list_parser.set_defaults(handler=_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
