"""What the subcommands share: the registry type, the common arguments, and small writers."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from unif2ace.io import atomic_write_bytes


class Commands(dict):
    """``name -> (add_arguments, help)`` of one module's subcommands. ``add_arguments(parser)`` adds
    the subcommand's arguments and returns the function that runs it (``run(args) -> dict | None``;
    the dict is printed as JSON)."""

    def register(
        self,
        name: str,
        help: str,
        *,
        data: bool = False,
        recipe: bool = False,
        writes_out: bool = True,
        out_optional: bool = False,
    ):
        """Register ``add(parser) -> run`` as subcommand ``name``. Every subcommand takes the
        common arguments (:func:`common_args`) first; ``recipe`` adds :func:`recipe_args`, ``data``
        the ``--data`` dataset folder (read by :func:`data_dir`). ``writes_out``: the command
        writes into ``--out``, which :func:`unif2ace.cli.main` then checks before any work
        (:func:`writable_folder`); a command that reads ``--out`` checks what it writes itself.
        ``out_optional``: ``--out`` may be left out (the command checks when it needs it)."""

        def deco(add: Callable) -> Callable:
            def add_arguments(p: argparse.ArgumentParser) -> Callable:
                p.set_defaults(writes_out=writes_out)
                common_args(p, out_required=not out_optional)
                if recipe:
                    recipe_args(p)
                if data:
                    p.add_argument(
                        "--data", type=Path, help="dataset folder (default <out>/synthface)"
                    )
                return add(p)

            self[name] = (add_arguments, help)
            return add

        return deco


def _bounded(kind: type, low: float, strict: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: ``kind(text)``, refused unless ``>= low`` (``> low`` when
    ``strict``); argparse names the option in the error."""

    def parse(text: str):
        value = kind(text)  # a ValueError: argparse says "invalid int value"
        if not (value > low if strict else value >= low) or math.isinf(value):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if strict else '>='} {low:g}, got {text}"
                + ("" if value == value else " (not a number)")
            )
        return value

    parse.__name__ = kind.__name__
    return parse


pos_int = _bounded(int, 1)
nonneg_int = _bounded(int, 0)
pos_float = _bounded(float, 0, strict=True)
nonneg_float = _bounded(float, 0)


def common_args(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument(
        "--out", required=out_required, type=Path, help="output folder (everything goes here)"
    )
    # default 1: on a shared 2-core machine two OpenMP threads spin-wait on each other, and a
    # judge training step gets many times slower under load
    p.add_argument("--threads", type=pos_int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def int_options(p: argparse.ArgumentParser, minimum: int | None = None, **defaults: int) -> None:
    """One integer option per keyword, in order: ``n_gen=256`` adds ``--n-gen`` (default 256);
    with ``minimum``, a smaller value is refused."""
    kind = int if minimum is None else _bounded(int, minimum)
    for name, default in defaults.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default)


# ---------------------------------------------------------------------------------------------
# outputs, checked before the work: a bad path fails in a second, not after an hour of training


def writable_folder(path, option: str) -> Path:
    """Make folder ``path`` (and its parents) and check that a file can be written in it (a probe
    file, removed at once: permissions and read-only mounts alike); a ValueError naming
    ``option`` otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path}: that is a file; a folder is expected there")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".unif2ace_write_check_")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot write there ({e.strerror or e})") from None
    return path


def writable_file(path, option: str) -> Path:
    """Check that file ``path`` can be written: not a folder, and its folder writable (made if
    missing)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path}: that is a folder; give a file name in it")
    for parent in path.parents:  # name the file that stands where a folder must be
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option} {path}: {parent} is a file, not a folder")
            break
    writable_folder(path.parent, option)
    return path


def recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML recipe (sections model, train, data)")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="overrides, e.g. train.steps=200 model.alpha=0",
    )


def run_command(commands: Commands, name: str, args: argparse.Namespace, extra: list[str]):
    """Run subcommand ``name`` with the ``--out`` / ``--threads`` / ``--quiet`` of ``args`` and the
    arguments ``extra`` (how ``data-all`` and ``demo`` chain the data steps)."""
    add, _ = commands[name]
    p = argparse.ArgumentParser(prog=f"unif2ace {name}")
    run = add(p)
    common = ["--out", str(args.out), "--threads", str(args.threads)]
    return run(p.parse_args([*common, *(["--quiet"] if args.quiet else []), *extra]))


def data_dir(args) -> Path:
    return Path(args.data) if getattr(args, "data", None) else Path(args.out) / "synthface"


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def save_png(image: Image.Image, path) -> None:
    """``image`` as a PNG at ``path``, written atomically (:func:`unif2ace.io.atomic_write_bytes`)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def save_grid(images, path, cols: int = 8, labels: list[str] | None = None, scale: int = 2) -> None:
    """A PNG grid of ``uint8 [N, H, W, 3]`` images (with short labels under each when given)."""
    n = len(images)
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    h, w = images.shape[1] * scale, images.shape[2] * scale
    lab = 12 if labels else 0
    grid = Image.new("RGB", (cols * w, rows * (h + lab)), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(Image.fromarray(im).resize((w, h), Image.NEAREST), (c * w, r * (h + lab)))
        if labels:
            draw.text((c * w + 2, r * (h + lab) + h), labels[i][: w // 6], fill="black")
    save_png(grid, path)


def save_pairs_grid(orig, recs, path, cols: int = 8) -> None:
    """A PNG grid of rows of ``cols`` originals, each row followed by their reconstructions."""
    pairs = [
        im for i in range(0, len(orig), cols) for im in (*orig[i : i + cols], *recs[i : i + cols])
    ]
    save_grid(np.stack(pairs), path, cols=min(cols, len(orig)), scale=1)
