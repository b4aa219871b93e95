"""The ``esvit`` command. Subcommands live one per module in :mod:`esvit.commands` and are registered in
:data:`COMMANDS` (name -> module path); adding one is one module plus one line here."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import EsvitError

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS: dict[str, str] = {
    "pretrain": "esvit.commands.pretrain",
    "make-dataset": "esvit.commands.make_dataset",
    "eval-knn": "esvit.commands.eval_knn",
    "eval-linear": "esvit.commands.eval_linear",
    "viz-correspondence": "esvit.commands.viz_correspondence",
    "viz-attention": "esvit.commands.viz_attention",
    "demo": "esvit.commands.demo",
    "ablate": "esvit.commands.ablate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esvit", description="EsViT self-supervised pretraining on esvit_kernels")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=mod.HELP, description=mod.DESCRIPTION)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``esvit`` console script and of ``python -m esvit``; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if extra:  # section.key=value overrides may come after options too
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args._run(args) or 0)
    except EsvitError as exc:
        rank = os.environ.get("RANK")
        who = f" [rank {rank}]" if rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"esvit {args.command}{who}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"esvit {args.command}: interrupted", file=sys.stderr)
        return 130
