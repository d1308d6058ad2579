"""What the subcommands share: the registry type, the common arguments, and small writers."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from unif2ace.io import atomic_write_bytes


class Commands(dict):
    """``name -> (add_arguments, help)`` of one module's subcommands. ``add_arguments(parser)`` adds
    the subcommand's arguments and returns the function that runs it (``run(args) -> dict | None``;
    the dict is printed as JSON)."""

    def register(self, name: str, help: str, *, data: bool = False, recipe: bool = False):
        """Register ``add(parser) -> run`` as subcommand ``name``. Every subcommand takes the
        common arguments (:func:`common_args`) first; ``recipe`` adds :func:`recipe_args`, ``data``
        the ``--data`` dataset folder (read by :func:`data_dir`)."""

        def deco(add: Callable) -> Callable:
            def add_arguments(p: argparse.ArgumentParser) -> Callable:
                common_args(p)
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


def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="output folder (everything goes here)")
    # default 1: on a shared 2-core machine two OpenMP threads spin-wait on each other, and a
    # judge training step gets many times slower under load
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def int_options(p: argparse.ArgumentParser, **defaults: int) -> None:
    """One integer option per keyword, in order: ``n_gen=256`` adds ``--n-gen`` (default 256)."""
    for name, default in defaults.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default)


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
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def save_pairs_grid(orig, recs, path, cols: int = 8) -> None:
    """A PNG grid of rows of ``cols`` originals, each row followed by their reconstructions."""
    pairs = [
        im for i in range(0, len(orig), cols) for im in (*orig[i : i + cols], *recs[i : i + cols])
    ]
    save_grid(np.stack(pairs), path, cols=min(cols, len(orig)), scale=1)
