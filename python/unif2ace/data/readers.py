"""Readers for caption / VQA / attribute records on disk (SynthFace, UniF²aceD-1M, FFHQ-Text,
CelebA captions...).

A record file is JSON lines (``.jsonl``), a JSON array (``.json``) or Parquet (``.parquet``); the
format follows the extension unless given. Field names are configurable with :class:`FieldMap`, so a
copy of a real dataset loads without rewriting it: e.g. FFHQ-Text style
``FieldMap(image="file_name", text="text")``, a HF Parquet export whose image column is
``{"bytes": ..., "path": ...}`` works as is.

Errors: a record that does not parse, lacks a required field, has a field of the wrong type or
points to an image that does not exist raises :class:`RecordError` naming the file and the line
(the row number for Parquet, 1-based). With ``on_error="skip"`` such records are skipped and counted
in :class:`ReadStats` (with the first messages kept); nothing else is dropped. Blank lines in JSON
lines files are not records and are ignored.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from unif2ace.data.taxonomy import CATEGORIES, encode_attributes

FORMATS = ("jsonl", "json", "parquet")


class RecordError(ValueError):
    """A corrupt or missing record: ``path`` and ``line`` say where."""

    def __init__(self, path, line: int, message: str):
        self.path, self.line = str(path), line
        super().__init__(f"{path}:{line}: {message}")


@dataclass
class FieldMap:
    """Names of the fields in the record files. ``None`` for an optional field means "absent"."""

    image: str = "image"
    text: str = "caption"
    question: str = "question"
    answer: str = "answer"
    id: str | None = "id"
    attributes: str | None = "attributes"
    identity: str | None = "identity"


@dataclass
class ReadStats:
    read: int = 0
    skipped: int = 0
    messages: list[str] = field(default_factory=list)  # the first few skip reasons

    def note(self, err: Exception, keep: int = 20):
        self.skipped += 1
        if len(self.messages) < keep:
            self.messages.append(str(err))


@dataclass
class Record:
    """One record: where it came from, its image (path or encoded bytes) and its text fields."""

    source: str
    line: int
    id: str
    image: str | bytes
    texts: list[str] = field(default_factory=list)  # captions (several for CelebA-style data)
    question: str | None = None
    answer: str | None = None
    attributes: dict | None = None
    identity: int | None = None


def detect_format(path) -> str:
    name = str(path).lower()
    for ext, fmt in (
        (".jsonl", "jsonl"),
        (".ndjson", "jsonl"),
        (".json", "json"),
        (".parquet", "parquet"),
        (".pq", "parquet"),
    ):
        if name.endswith(ext):
            return fmt
    raise ValueError(
        f"{path}: cannot tell the record format from the extension; pass format= one of {FORMATS}"
    )


def iter_rows(
    path, format: str = "auto", on_error: str = "raise", stats: ReadStats | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield ``(line, row)`` for every record of a file; ``line`` is 1-based."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"record file not found: {path}")
    fmt = detect_format(path) if format == "auto" else format
    stats = stats if stats is not None else ReadStats()

    def bad(line, msg):
        err = RecordError(path, line, msg)
        if on_error == "raise":
            raise err
        stats.note(err)

    if fmt == "jsonl":
        with open(path, encoding="utf-8", errors="strict") as f:
            for n, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    bad(n, f"invalid JSON ({e.msg} at column {e.colno})")
                    continue
                if not isinstance(row, dict):
                    bad(n, f"a record must be a JSON object, got {type(row).__name__}")
                    continue
                yield n, row
    elif fmt == "json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RecordError(path, e.lineno, f"invalid JSON ({e.msg})") from None
        if not isinstance(rows, list):
            raise RecordError(path, 1, "a .json record file must hold a list of objects")
        for n, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                bad(n, f"record {n} must be an object, got {type(row).__name__}")
                continue
            yield n, row
    elif fmt == "parquet":
        import pyarrow.parquet as pq  # heavy to import, and only Parquet files need it

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise RecordError(path, 0, f"not a readable Parquet file ({e})") from None
        n = 0
        for batch in pf.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                n += 1
                yield n, row
    else:
        raise ValueError(f"unknown record format {fmt!r}; expected one of {FORMATS}")


def _get(row: dict, name: str | None, path, line, required=True, kinds=(str,)):
    if name is None:
        return None
    if name not in row or row[name] is None:
        if required:
            raise RecordError(path, line, f"missing field {name!r} (fields present: {sorted(row)})")
        return None
    v = row[name]
    if not isinstance(v, kinds):
        raise RecordError(
            path,
            line,
            f"field {name!r} has type {type(v).__name__}, expected "
            f"{' or '.join(k.__name__ for k in kinds)}",
        )
    return v


def _image_ref(v, path, line, image_root: Path, check_images: bool) -> str | bytes:
    """A record's image: a path (relative to ``image_root``), raw bytes, or a HF-style
    ``{"bytes": ..., "path": ...}`` struct."""
    if isinstance(v, dict):
        if v.get("bytes"):
            return bytes(v["bytes"])
        v = v.get("path")
        if not v:
            raise RecordError(path, line, "image struct has neither 'bytes' nor 'path'")
    if isinstance(v, (bytes, bytearray)):
        if not v:
            raise RecordError(path, line, "empty image bytes")
        return bytes(v)
    p = Path(v)
    p = p if p.is_absolute() else image_root / p
    if check_images and not p.is_file():
        raise RecordError(path, line, f"image file not found: {p}")
    return str(p)


def read_records(
    path,
    kind: str = "caption",
    fields: FieldMap | None = None,
    format: str = "auto",
    image_root=None,
    on_error: str = "raise",
    check_images: bool = True,
) -> tuple[list[Record], ReadStats]:
    """Read a caption (``kind="caption"``), VQA (``"vqa"``) or attribute (``"attributes"``)
    record file. Image paths are resolved against ``image_root`` (default: the file's folder).
    Returns the records and the read statistics."""
    if kind not in ("caption", "vqa", "attributes"):
        raise ValueError(f"kind must be caption, vqa or attributes, got {kind!r}")
    fields = fields or FieldMap()
    path = Path(path)
    image_root = Path(image_root) if image_root is not None else path.parent
    stats = ReadStats()
    out: list[Record] = []
    for line, row in iter_rows(path, format, on_error, stats):
        try:
            img = row.get(fields.image)
            if img is None:
                raise RecordError(
                    path, line, f"missing field {fields.image!r} (fields present: {sorted(row)})"
                )
            image = _image_ref(img, path, line, image_root, check_images)
            rid = _get(row, fields.id, path, line, required=False, kinds=(str, int))
            rec = Record(str(path), line, str(rid if rid is not None else line), image)
            rec.identity = _get(row, fields.identity, path, line, required=False, kinds=(int,))
            if kind == "caption":
                t = _get(row, fields.text, path, line, kinds=(str, list))
                texts = [t] if isinstance(t, str) else t
                if not texts or not all(isinstance(x, str) and x.strip() for x in texts):
                    raise RecordError(
                        path,
                        line,
                        f"field {fields.text!r} must be a non-empty string or list of strings",
                    )
                rec.texts = texts
            elif kind == "vqa":
                rec.question = _get(row, fields.question, path, line)
                rec.answer = _get(row, fields.answer, path, line, kinds=(str, int, float, bool))
                rec.answer = str(rec.answer)
            else:
                rec.attributes = _get(row, fields.attributes, path, line, kinds=(dict,))
        except RecordError as err:
            if on_error == "raise":
                raise
            stats.note(err)
            continue
        stats.read += 1
        out.append(rec)
    return out, stats


def load_image(image: str | bytes, size: int | None = None, where: str = "") -> np.ndarray:
    """Decode one image to ``uint8 [H, W, 3]``, resized (bicubic) to ``size`` when given. A file
    that does not decode raises ``RecordError``-style ``ValueError`` naming it (and ``where``)."""
    try:
        src = io.BytesIO(image) if isinstance(image, bytes) else image
        with Image.open(src) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8).copy()
    except (OSError, ValueError) as e:
        name = "<bytes>" if isinstance(image, bytes) else image
        raise ValueError(
            f"{where + ': ' if where else ''}cannot decode image {name} ({e})"
        ) from None


# ---------------------------------------------------------------------------------------------
# SynthFace-specific: a split as arrays


@dataclass
class FaceArrays:
    """One split in memory: images ``uint8 [N, H, W, 3]``, labels ``int64 [N, C]`` (-1 hidden) in
    taxonomy order, identities ``int64 [N]`` and the image ids."""

    images: np.ndarray
    labels: np.ndarray
    identities: np.ndarray
    ids: list[str]


def find_split_file(root, name: str, split: str) -> Path:
    root = Path(root)
    for ext in ("jsonl", "parquet", "json"):
        p = root / f"{name}_{split}.{ext}"
        if p.exists():
            return p
    raise FileNotFoundError(f"no {name}_{split}.jsonl/.parquet/.json under {root}")


def load_split(
    root, split: str, size: int | None = None, limit: int | None = None, progress: bool = False
) -> FaceArrays:
    """Load a SynthFace split (images + attribute labels) into memory."""
    path = find_split_file(root, "attributes", split)
    recs, _ = read_records(path, kind="attributes", image_root=root)
    if limit is not None:
        recs = recs[:limit]
    images = [
        load_image(r.image, size, f"{r.source}:{r.line}")
        for r in tqdm(recs, desc=f"load {split}", disable=not progress, unit="img")
    ]
    return FaceArrays(
        images=np.stack(images) if images else np.zeros((0, size or 64, size or 64, 3), np.uint8),
        labels=np.array([encode_attributes(r.attributes) for r in recs], dtype=np.int64).reshape(
            len(recs),
            len(CATEGORIES),  # (-1 cannot size an empty split)
        ),
        identities=np.array(
            [-1 if r.identity is None else r.identity for r in recs], dtype=np.int64
        ),
        ids=[r.id for r in recs],
    )


def load_images_from_records(
    path,
    fields: FieldMap | None = None,
    size: int = 64,
    image_root=None,
    on_error: str = "raise",
    limit: int | None = None,
    format: str = "auto",
) -> np.ndarray:
    """Images of any caption-style record file as ``uint8 [N, size, size, 3]`` (for the image
    tokenizer on user data). Undecodable images raise, or are skipped with ``on_error="skip"``."""
    recs, stats = read_records(path, "caption", fields, format, image_root, on_error)
    out = []
    for r in recs[:limit]:
        try:
            out.append(load_image(r.image, size, f"{r.source}:{r.line}"))
        except ValueError as e:
            if on_error == "raise":
                raise
            stats.note(e)
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def dataset_stats(root) -> dict:
    """Coverage and caption statistics of a SynthFace folder."""
    out = {}
    for split in ("train", "val", "test"):
        try:
            path = find_split_file(root, "attributes", split)
        except FileNotFoundError:
            continue
        seen = {c.name: set() for c in CATEGORIES}
        n, mentioned = 0, 0
        for _, row in iter_rows(path):
            n += 1
            mentioned += len(row.get("caption_attributes", []))
            for k, v in row["attributes"].items():
                if v is not None:
                    seen[k].add(v)
        missing = {
            c.name: sorted(set(c.values) - seen[c.name])
            for c in CATEGORIES
            if set(c.values) - seen[c.name]
        }
        out[split] = {
            "images": n,
            "caption_attributes_mean": mentioned / max(n, 1),
            "missing_values": missing,
        }
    out["categories"] = len(CATEGORIES)
    out["values"] = sum(len(c.values) for c in CATEGORIES)
    return out
