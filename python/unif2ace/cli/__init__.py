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
inference, evaluation, ablations), :mod:`unif2ace.cli.demo`, and for UniF²ace from the released
Show-o :mod:`unif2ace.cli.paper` (``init``) and :mod:`unif2ace.cli.features`
(``tokenize-images``); each module holds a
``COMMANDS`` registry (name -> (add_arguments, help)) that :func:`build_parser` reads.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import threading
from pathlib import Path

import torch

import unif2ace
from unif2ace import _backend
from unif2ace.cli import assets, data, demo, features, model, paper
from unif2ace.cli._common import print_json, writable_folder

COMMANDS = {
    **data.COMMANDS, **assets.COMMANDS, **paper.COMMANDS, **features.COMMANDS,
    **model.COMMANDS, **demo.COMMANDS,
}  # fmt: skip

# exit statuses: 2 for every error the user can fix (argparse's own too), 128 + SIGINT for Ctrl-C
# (what shells and make read as "interrupted")
USAGE_ERROR = 2
INTERRUPTED = 128 + signal.SIGINT
# file-system errors that are about the path given, not a bug: one line, no traceback
_PATH_ERRNOS = {
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG,
    errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOENT,
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unif2ace", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"unif2ace {unif2ace.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=add(p))
    return parser


def _check_seeds(args) -> None:
    """Every ``--seed`` / ``--*-seed`` option is a non-negative integer (numpy refuses others
    without naming the option)."""
    for key, value in vars(args).items():
        if (key == "seed" or key.endswith("_seed")) and isinstance(value, int) and value < 0:
            raise ValueError(
                f"argument --{key.replace('_', '-')}: a seed must be >= 0, got {value}"
            )


def _check_backend() -> None:
    """The process default backend (``UNIF2ACE_BACKEND``) must run here, checked before any work:
    ops would otherwise fail mid-run."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = ", ".join(_backend.BACKENDS)
    try:
        _backend.get_backend()
    except ValueError as e:  # names the value and the backends
        raise ValueError(f"{e}; unset UNIF2ACE_BACKEND or set it to one of those") from None
    try:
        _backend.resolve(None, device, "UNIF2ACE_BACKEND")
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"{e}; unset UNIF2ACE_BACKEND or set it to one of {names}") from None


@contextlib.contextmanager
def _sigint_in_this_process_only():
    """Ctrl-C signals the terminal's whole process group: forked workers (make-data's) ignore it
    and are stopped by their parent, which alone raises KeyboardInterrupt, so one line is printed
    instead of a traceback per worker. Only where Python's default handler is installed."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    parent = os.getpid()

    def handler(signum, frame):
        if os.getpid() == parent:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _error(command: str, message: str) -> int:
    print(f"unif2ace {command}: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cmd = args.command
    try:
        _check_seeds(args)
        _check_backend()
        if args.writes_out:
            writable_folder(args.out, "--out")
        torch.set_num_threads(args.threads)
        with _sigint_in_this_process_only():
            res = args.func(args)
    except KeyboardInterrupt:
        print(f"unif2ace {cmd}: interrupted; rerun the same command to resume", file=sys.stderr)
        return INTERRUPTED
    except (FileNotFoundError, ValueError) as e:
        return _error(cmd, str(e))
    except OSError as e:
        if e.errno not in _PATH_ERRNOS:
            raise
        return _error(cmd, f"{e.filename}: {e.strerror}" if e.filename else str(e))
    if res is not None and cmd != "data-all":
        print_json(res)
    elif res is not None:
        print(f"report: {Path(args.out) / 'report.json'}")
    return 0
