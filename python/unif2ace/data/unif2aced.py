"""A reader for a UniF²aceD-1M copy on disk (HF dataset ``tulvgengenr/UniF2aceD-1M``: ~130K face
images with long captions and ~1M VQA pairs), and :func:`write_mini_unif2aced`, which writes a
tiny dataset in the same layout (for tests and for trying the pipeline end to end).

The dataset's file layout is not documented anywhere we could find, so this module states the
layout it reads, and matches field names tolerantly (case-insensitively, through the alias lists
below) so that a copy exported with other column names loads as it is:

* **images**: files under the folder, in any sub-folder (``.jpg``, ``.jpeg``, ``.png``, ``.webp``),
  referenced from the records by a path relative to the record file's folder or to the dataset
  folder (a bare file name also matches when exactly one image under the folder has that name).
  Absolute paths are accepted too. A Parquet image column holding a ``{"bytes", "path"}`` struct is
  read through its ``path``; images embedded only as bytes are refused (extract them to files).
* **captions**: ``captions.jsonl`` / ``.json`` / ``.parquet``, or any record file whose name
  contains ``caption``: one record per image, the image under one of :data:`IMAGE_KEYS` and the
  caption under one of :data:`CAPTION_KEYS` (a list of captions: its first non-empty one). An
  image with several caption records keeps the first (the others are counted in ``stats``).
* **VQA**: ``vqa.jsonl`` / ``.json`` / ``.parquet``, or any record file whose name contains ``vqa``
  or the word ``qa``. A record is either flat (image + a question under :data:`QUESTION_KEYS` +
  an answer under :data:`ANSWER_KEYS`: one turn) or LLaVA-style (image + ``conversations``: a list
  of ``{"from": "human", "value": "<image>\\n..."}`` / ``{"from": "gpt", "value": "..."}``
  messages, several turns per record; ``role`` / ``content`` with ``user`` / ``assistant`` works
  too, ``system`` messages are skipped). The ``<image>`` tag and the whitespace around it are
  removed from the questions.
* **splits**: a record file belongs to the split named by a ``train`` / ``test`` / ``val`` /
  ``validation`` word in its path under the folder (``train/captions.jsonl``,
  ``captions_test.parquet``...); a file with no such word belongs to ``train``. So a folder
  without split files is all ``train``.

Record files are ``.jsonl`` (``.ndjson``), ``.json`` (a list of objects) or ``.parquet`` (``.pq``),
read with :func:`unif2ace.data.readers.iter_rows`; other files and hidden folders are ignored.

Errors name what was expected: a folder with no captions file (FileNotFoundError); a record
whose keys match none of the aliases, a referenced image that does not exist (the first few are
named and all are counted), an empty split (ValueError; a record's errors are
:class:`~unif2ace.data.readers.RecordError` with its file and line). With ``on_error="skip"`` bad
records and records of missing images are skipped and counted in ``stats`` instead.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from unif2ace.data.readers import ReadStats, RecordError, iter_rows

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
RECORD_EXTS = (".jsonl", ".ndjson", ".json", ".parquet", ".pq")
SPLIT_WORDS = ("train", "test", "val", "validation")

# field aliases, in order of preference (matched case-insensitively)
IMAGE_KEYS = ("image", "image_path", "file_name", "path", "img", "filename", "img_path")
CAPTION_KEYS = ("caption", "text", "description", "prompt", "long_caption", "captions")
QUESTION_KEYS = ("question", "q", "query")
ANSWER_KEYS = ("answer", "a", "response")
CONVERSATION_KEYS = ("conversations", "conversation", "messages")
_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant", "bot", "model")
_IMAGE_TAG = re.compile(r"\s*<image>\s*")


@dataclass
class UniF2aceData:
    """One split of a UniF²aceD-1M folder.

    ``images``: paths relative to ``root`` (posix, sorted, unique; only the images that a caption
    or VQA record refers to). ``captions[i]``: image i's caption ("" when it has none). ``vqa``:
    one entry per VQA record, ``(image index, [(question, answer), ...])`` in file order.
    ``stats``: record counts, the files read, duplicates and skipped records."""

    root: Path
    split: str
    images: list[str]
    captions: list[str]
    vqa: list[tuple[int, list[tuple[str, str]]]]
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def path(self, i: int) -> Path:
        """The file of image ``i``."""
        return self.root / self.images[i]


# ---------------------------------------------------------------------------------------------
# finding the files


def _words(rel: Path) -> set[str]:
    return {w for part in rel.parts for w in re.split(r"[^a-z0-9]+", part.lower()) if w}


def split_of(rel: Path) -> str:
    """The split a record file belongs to, from its path under the dataset folder (train when
    its path names none)."""
    words = _words(rel.with_suffix(""))
    for s in SPLIT_WORDS:
        if s in words:
            return s
    return "train"


def _kind(rel: Path) -> str | None:
    """``"vqa"``, ``"caption"`` or None (not a record file of ours): from the file name, else
    from the nearest folder name that says (``vqa/train-00000.parquet``)."""
    for part in reversed(rel.with_suffix("").parts):
        low = part.lower()
        if "vqa" in low or "qa" in _words(Path(low)):
            return "vqa"
        if "caption" in low:
            return "caption"
    return None


def _scan(root: Path) -> tuple[set[str], list[Path]]:
    """(every image file under ``root`` as a posix relative path, every record file's relative
    path), in one walk; hidden folders and files are skipped."""
    images: set[str] = set()
    records: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.startswith("."):
                continue
            low = name.lower()
            if low.endswith(IMAGE_EXTS):
                images.add((rel_dir / name).as_posix())
            elif low.endswith(RECORD_EXTS):
                records.append(rel_dir / name)
    return images, sorted(records)


# ---------------------------------------------------------------------------------------------
# fields


def _pick(row: dict, aliases: tuple[str, ...]):
    """(key, value) of the first alias present (case-insensitive) with a non-None value."""
    lower = {str(k).lower(): k for k in row}
    for a in aliases:
        k = lower.get(a)
        if k is not None and row[k] is not None:
            return k, row[k]
    return None, None


def _no_field(path, line, what: str, aliases: tuple[str, ...], row: dict) -> RecordError:
    return RecordError(
        path,
        line,
        f"no {what} field: expected one of {'/'.join(aliases)}; the record has keys "
        f"{sorted(map(str, row))}",
    )


def _text(v, path, line, key: str) -> str:
    if isinstance(v, (list, tuple)):  # several captions: the first non-empty one
        v = next((x for x in v if isinstance(x, str) and x.strip()), None)
        if v is None:
            raise RecordError(path, line, f"field {key!r} holds no non-empty string")
    if isinstance(v, bool):  # a yes/no answer stored as a boolean
        return "yes" if v else "no"
    if not isinstance(v, (str, int, float)):
        raise RecordError(path, line, f"field {key!r} must be a string, got {type(v).__name__}")
    return str(v)


def _message_text(v) -> str | None:
    """A message's text: a string, or the text items of a list of ``{"type", "text"/"value"}``."""
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        parts = [
            x.get("text", x.get("value"))
            for x in v
            if isinstance(x, dict) and x.get("type", "text") == "text"
        ]
        if all(isinstance(p, str) for p in parts):
            return "\n".join(parts)
    return None


def _turns(row: dict, path, line) -> list[tuple[str, str]]:
    """A VQA record's (question, answer) turns, flat or LLaVA-style."""
    _, conv = _pick(row, CONVERSATION_KEYS)
    if conv is None:
        qk, q = _pick(row, QUESTION_KEYS)
        ak, a = _pick(row, ANSWER_KEYS)
        if q is None or a is None:
            raise RecordError(
                path,
                line,
                f"expected a question ({'/'.join(QUESTION_KEYS)}) and an answer "
                f"({'/'.join(ANSWER_KEYS)}), or {'/'.join(CONVERSATION_KEYS)}; the record has "
                f"keys {sorted(map(str, row))}",
            )
        return [(_IMAGE_TAG.sub(" ", _text(q, path, line, qk)).strip(), _text(a, path, line, ak))]
    if isinstance(conv, str):  # some exports store the list as a JSON string
        try:
            conv = json.loads(conv)
        except json.JSONDecodeError:
            raise RecordError(path, line, "conversations is a string that is not JSON") from None
    if not isinstance(conv, list) or not conv:
        raise RecordError(path, line, "conversations must be a non-empty list of messages")
    turns, question = [], None
    for k, msg in enumerate(conv, 1):
        if not isinstance(msg, dict):
            raise RecordError(path, line, f"message {k} is not an object")
        who = str(msg.get("from", msg.get("role", ""))).lower()
        text = _message_text(msg.get("value", msg.get("content")))
        if who == "system":
            continue
        if who not in _HUMAN + _GPT or text is None:
            raise RecordError(
                path,
                line,
                f"message {k}: expected from/role in {'/'.join(_HUMAN + _GPT)} and a text "
                f"value/content; it has {sorted(map(str, msg))}",
            )
        if who in _HUMAN:
            if question is not None:
                raise RecordError(path, line, f"message {k}: two questions without an answer")
            question = _IMAGE_TAG.sub(" ", text).strip()
        else:
            if question is None:
                raise RecordError(path, line, f"message {k}: an answer without a question")
            turns.append((question, text.strip()))
            question = None
    if question is not None:
        raise RecordError(path, line, "the last question has no answer")
    if not turns:
        raise RecordError(path, line, "conversations hold no question/answer turn")
    return turns


class _Resolver:
    """Image references -> paths relative to the dataset folder."""

    def __init__(self, root: Path, images: set[str]):
        self.root, self.images = root, images
        self._by_name: dict[str, list[str]] | None = None

    def __call__(self, ref, record_dir: Path) -> str | None:
        if isinstance(ref, dict):  # a HF image struct
            ref = ref.get("path") or None
            if ref is None:
                return ""
        if not isinstance(ref, str) or not ref.strip():
            return ""
        ref = ref.strip().replace("\\", "/")
        p = Path(ref)
        if p.is_absolute():
            try:
                rel = p.resolve().relative_to(self.root.resolve()).as_posix()
            except ValueError:
                return str(p) if p.is_file() else None
            return rel if rel in self.images else None
        for cand in ((record_dir / p).as_posix(), p.as_posix()):
            cand = os.path.normpath(cand).replace(os.sep, "/")
            if cand in self.images:
                return cand
        if self._by_name is None:
            self._by_name = {}
            for rel in self.images:
                self._by_name.setdefault(rel.rpartition("/")[2], []).append(rel)
        hits = self._by_name.get(p.name, [])
        return hits[0] if len(hits) == 1 else None


# ---------------------------------------------------------------------------------------------
# the reader


def read_unif2aced(root, split: str = "train", on_error: str = "raise") -> UniF2aceData:
    """Read split ``split`` of a UniF²aceD-1M folder (layout: the module docstring).

    ``on_error="skip"`` skips bad records and records whose image is missing (counted in
    ``stats["skipped"]``, the first messages in ``stats["messages"]``) instead of raising."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    image_files, record_files = _scan(root)
    ours = [(rel, _kind(rel)) for rel in record_files if _kind(rel)]
    splits = sorted({split_of(rel) for rel, _ in ours})
    cap_files = [rel for rel, k in ours if k == "caption" and split_of(rel) == split]
    vqa_files = [rel for rel, k in ours if k == "vqa" and split_of(rel) == split]
    if not cap_files:
        found = ", ".join(r.as_posix() for r in record_files[:10]) or "none"
        other = f"; the splits present are {', '.join(splits)}" if splits else ""
        raise FileNotFoundError(
            f"{root}: no captions file for split {split!r} (expected captions.jsonl, "
            f"captions.json or captions.parquet, or a .jsonl/.json/.parquet file whose name "
            f"contains 'caption'; record files found: {found}){other}"
        )
    resolve = _Resolver(root, image_files)
    read = ReadStats()
    missing: list[str] = []
    n_missing = 0

    def bad(err: Exception):
        if on_error == "raise":
            raise err
        read.note(err)

    def image_of(row, path: Path, line: int, rel_dir: Path) -> str | None:
        nonlocal n_missing
        key, ref = _pick(row, IMAGE_KEYS)
        if key is None:
            bad(_no_field(path, line, "image", IMAGE_KEYS, row))
            return None
        if isinstance(ref, (bytes, bytearray)) or (isinstance(ref, dict) and not ref.get("path")):
            bad(RecordError(path, line, "the image is embedded as bytes; extract it to a file"))
            return None
        img = resolve(ref, rel_dir)
        if img == "":
            bad(RecordError(path, line, f"field {key!r} is empty or not a path"))
            return None
        if img is None:
            n_missing += 1
            if len(missing) < 5:
                missing.append(
                    f"{ref if not isinstance(ref, dict) else ref['path']} ({path}:{line})"
                )
            if on_error == "skip":
                read.note(RecordError(path, line, f"image not found: {ref}"))
        return img

    captions: dict[str, str] = {}
    n_cap = dup = 0
    for rel in cap_files:
        path = root / rel
        for line, row in iter_rows(path, "auto", on_error, read):
            img = image_of(row, path, line, rel.parent)
            key, text = _pick(row, CAPTION_KEYS)
            if key is None:
                bad(_no_field(path, line, "caption", CAPTION_KEYS, row))
                continue
            try:
                text = _text(text, path, line, key)
            except RecordError as e:
                bad(e)
                continue
            if img is None:
                continue
            n_cap += 1
            if img in captions:
                dup += 1
            else:
                captions[img] = text
    vqa_raw: list[tuple[str, list[tuple[str, str]]]] = []
    for rel in vqa_files:
        path = root / rel
        for line, row in iter_rows(path, "auto", on_error, read):
            img = image_of(row, path, line, rel.parent)
            try:
                turns = _turns(row, path, line)
            except RecordError as e:
                bad(e)
                continue
            if img is not None:
                vqa_raw.append((img, turns))
    if n_missing and on_error == "raise":
        more = f" and {n_missing - len(missing)} more" if n_missing > len(missing) else ""
        raise ValueError(
            f"{root}: {n_missing} referenced image(s) do not exist under the folder (looked "
            f"next to the record file and under {root}): {', '.join(missing)}{more}"
        )
    images = sorted(set(captions) | {img for img, _ in vqa_raw})
    if not images:
        files = ", ".join(r.as_posix() for r in cap_files + vqa_files)
        raise ValueError(
            f"{root}: split {split!r} is empty: its record files ({files}) hold no usable "
            "caption or VQA record"
            + (f" ({read.skipped} skipped: {read.messages[0]})" if read.skipped else "")
        )
    index = {img: i for i, img in enumerate(images)}
    stats = {
        "caption_files": [r.as_posix() for r in cap_files],
        "vqa_files": [r.as_posix() for r in vqa_files],
        "splits": splits,
        "caption_records": n_cap,
        "duplicate_captions": dup,
        "images_without_caption": sum(1 for img in images if img not in captions),
        "vqa_records": len(vqa_raw),
        "vqa_turns": sum(len(t) for _, t in vqa_raw),
        "missing_images": n_missing,
        "skipped": read.skipped,
        "messages": read.messages,
    }
    return UniF2aceData(
        root=root,
        split=split,
        images=images,
        captions=[captions.get(img, "") for img in images],
        vqa=[(index[img], turns) for img, turns in vqa_raw],
        stats=stats,
    )


# ---------------------------------------------------------------------------------------------
# a tiny dataset in this layout


def write_mini_unif2aced(folder, n_images: int = 6, size: int = 64, seed: int = 0) -> Path:
    """Write a tiny dataset in the layout :func:`read_unif2aced` reads, and return its folder:
    ``images/00000.png`` ... (SynthFace drawings, ``size`` px), ``captions.jsonl`` (``image`` +
    ``caption``), ``vqa.jsonl`` (one flat ``image`` / ``question`` / ``answer`` record per image)
    and ``vqa_llava.json`` (one LLaVA-style record per image with two turns). Deterministic in
    ``seed``."""
    from unif2ace.data.synthface import draw_image, make_caption, make_vqa

    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    captions, flat, llava = [], [], []
    for i in range(n_images):
        img, attrs = draw_image(i, seed=seed, size=size)
        name = f"images/{i:05d}.png"
        img.save(folder / name)
        text_seed = seed * 1_000_003 + i
        captions.append({"image": name, "caption": make_caption(attrs, text_seed)[0]})
        qa = make_vqa(attrs, text_seed, n=3)
        flat.append({"image": name, "question": qa[0]["question"], "answer": qa[0]["answer"]})
        conv = []
        for j, x in enumerate(qa[1:3]):
            q = ("<image>\n" if j == 0 else "") + x["question"]
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": x["answer"]}]
        llava.append({"id": f"{i:05d}", "image": name, "conversations": conv})

    def jsonl(rows):
        return "".join(json.dumps(r) + "\n" for r in rows)

    (folder / "captions.jsonl").write_text(jsonl(captions))
    (folder / "vqa.jsonl").write_text(jsonl(flat))
    (folder / "vqa_llava.json").write_text(json.dumps(llava, indent=1))
    return folder
