"""`camelid <verb>`: a thin layer over the library. Every verb parses flags, calls plain functions, prints.

Bad input ends with one line on stderr and exit code 2; nothing here holds logic the library lacks. The verbs live
by group in model_verbs.py, train_verbs.py and plan_verbs.py; each adds its sub-parsers through `register`.
"""

from __future__ import annotations

import argparse
import sys

from camelid.checkpoint import CheckpointError
from camelid.cli import cluster_verbs, model_verbs, plan_verbs, quant_verbs, serve_verbs, train_verbs
from camelid.cli.model_verbs import build_byte_tokenizer
from camelid.config import ConfigError
from camelid.tokenizer import TokenizerError

__all__ = ["BAD_INPUT", "build_byte_tokenizer", "build_parser", "main"]

# FileExistsError: an --out that is a file where a folder goes
BAD_INPUT = (FileNotFoundError, NotADirectoryError, FileExistsError, ConfigError, CheckpointError, TokenizerError,
             ValueError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="camelid", description="LLaMA-family models: plan, train, tune, serve.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for group in (model_verbs, train_verbs, plan_verbs, cluster_verbs, serve_verbs, quant_verbs):
        group.register(verbs, argparse.RawDescriptionHelpFormatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BAD_INPUT as e:
        print(f"camelid {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `camelid generate ... | head` closed the pipe: not an error
        return 0
    except KeyboardInterrupt:  # Ctrl-C: the user's choice, not a crash (a run resumes from its last checkpoint)
        print(f"camelid {args.verb}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
