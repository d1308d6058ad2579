"""The ``unif2ace`` command (also ``python -m unif2ace``).

Every command writes under one output folder (``--out``); the data commands use these
sub-folders::

    <out>/synthface/        the dataset (make-data)
    <out>/text_tokenizer/   tokenizer.json (train-text-tokenizer)
    <out>/judge/            attribute judge + metrics.json (train-judge)
    <out>/encoders/         semantic/, identity/, embeddings/, metrics.json (train-encoders)
    <out>/vq/               image tokenizer + metrics.json (train-vq; its perceptual loss runs
                            through encoders/semantic, so train-encoders comes first)
    <out>/report.json       everything measured (data-all)

The subcommands live in :mod:`unif2ace.cli.data` (the dataset, ``data-all``),
:mod:`unif2ace.cli.assets` (judge, image tokenizer, encoders), :mod:`unif2ace.cli.model` (train,
inference, evaluation, ablations) and :mod:`unif2ace.cli.demo`; each module holds a
``COMMANDS`` registry (name -> (add_arguments, help)) that :func:`build_parser` reads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import unif2ace
from unif2ace.cli import assets, data, demo, model
from unif2ace.cli._common import print_json

COMMANDS = {**data.COMMANDS, **assets.COMMANDS, **model.COMMANDS, **demo.COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unif2ace", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"unif2ace {unif2ace.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=add(p))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "threads"):
        torch.set_num_threads(max(1, args.threads))
    try:
        res = args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"unif2ace {args.command}: error: {e}", file=sys.stderr)
        return 2
    if res is not None and args.command != "data-all":
        print_json(res)
    elif res is not None:
        print(f"report: {Path(args.out) / 'report.json'}")
    return 0
