"""SynthFace: a procedurally drawn fine-grained face dataset, deterministic from a seed.

Image ``i`` belongs to identity ``i // images_per_identity``. An identity fixes the face geometry
(width, height, eye spacing and height, nose length, mouth width, hairline) and the identity-level
attributes (face shape, skin tone, eye colour, natural hair colour, eyebrows); every image draws its
own expression, hair cut, accessories, shirt and background. Everything about image ``i`` is a
function of ``(seed, i)`` alone (numpy ``SeedSequence([seed, kind, i])``), so any subset of images
can be drawn by any worker in any order and the files are byte-identical from run to run.

Splits are by identity: identity ``j`` is in *test* when ``j % 10 == 0``, *val* when ``j % 10 == 1``
and *train* otherwise, so no person is seen in two splits.

On-disk layout (UniF²aceD-1M style: image files + caption records + VQA records, plus the attribute
file that lets every caption and answer be checked)::

    root/
      meta.json                      seed, size, counts, taxonomy, file list
      images/{split}/{index:06d}.png
      captions_{split}.jsonl         {"id", "image", "caption", "identity"}
      vqa_{split}.jsonl              {"id", "image", "question", "answer", "type", "attribute"}
      attributes_{split}.jsonl       {"id", "image", "identity", "attributes", "caption_attributes"}

``type`` is ``open`` or ``yes_no``; ``attribute`` names the category the question is about.
Image paths in records are relative to ``root``. ``fmt="parquet"`` writes the same records as
``.parquet`` files.
"""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from unif2ace.data.readers import FaceArrays
from unif2ace.data.render import HAT_COLOURS, render
from unif2ace.data.taxonomy import BY_NAME, CATEGORIES, encode_attributes, taxonomy_dict

SPLITS = ("train", "val", "test")
_IDENTITY, _IMAGE = 1, 2


def _rng(seed: int, kind: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, kind, index])))


def split_of_identity(identity: int) -> str:
    r = identity % 10
    return "test" if r == 0 else "val" if r == 1 else "train"


def _pick(rng, values, p=None):
    return values[int(rng.choice(len(values), p=p))]


@functools.lru_cache(maxsize=256)
def sample_identity(seed: int, identity: int) -> dict:
    """Identity-level attributes and face geometry (128-unit canvas). Cached: do not mutate."""
    rng = _rng(seed, _IDENTITY, identity)
    out = {c.name: _pick(rng, c.values) for c in CATEGORIES if c.identity}
    shape = out["face_shape"]
    fa, fb = {"oval": (23.5, 35.0), "round": (30.0, 30.5), "square": (27.5, 32.5)}[shape]
    out["fa"] = fa * float(rng.uniform(0.96, 1.04))
    out["fb"] = fb * float(rng.uniform(0.96, 1.04))
    out["eye_dx"] = float(rng.uniform(10.5, 13.0))
    out["eye_dy"] = float(rng.uniform(-2.0, 2.0))
    out["nose_len"] = float(rng.uniform(9.0, 13.0))
    out["mouth_w"] = float(rng.uniform(6.5, 9.5))
    out["mouth_dy"] = float(rng.uniform(-1.5, 1.5))
    out["hairline"] = float(rng.uniform(-1.5, 2.5))
    out["masculine"] = bool(rng.random() < 0.5)  # only shifts accessory odds; not an attribute
    return out


def sample_image(seed: int, index: int, images_per_identity: int) -> tuple[dict, dict]:
    """(identity, image) for image ``index``: image["attrs"] is the full attribute dict, with None
    where an attribute is hidden in this image."""
    identity = index // images_per_identity
    ident = sample_identity(seed, identity)
    rng = _rng(seed, _IMAGE, index)
    m = ident["masculine"]
    a: dict[str, str | None] = {}
    a["hair_length"] = _pick(rng, BY_NAME["hair_length"].values, [0.16, 0.28, 0.26, 0.30])
    a["hair_style"] = _pick(rng, BY_NAME["hair_style"].values)
    a["bangs"] = _pick(rng, ("no", "yes"), [0.62, 0.38])
    a["glasses"] = _pick(rng, BY_NAME["glasses"].values, [0.4, 0.2, 0.2, 0.2])
    a["beard"] = _pick(
        rng, BY_NAME["beard"].values, [0.4, 0.2, 0.2, 0.2] if m else [0.88, 0.04, 0.04, 0.04]
    )
    a["moustache"] = _pick(rng, ("no", "yes"), [0.6, 0.4] if m else [0.95, 0.05])
    a["expression"] = _pick(rng, BY_NAME["expression"].values)
    a["lipstick"] = _pick(rng, ("none", "red"), [0.94, 0.06] if m else [0.5, 0.5])
    a["earrings"] = _pick(rng, ("none", "hoops"), [0.88, 0.12] if m else [0.45, 0.55])
    a["hat"] = _pick(rng, BY_NAME["hat"].values, [0.55, 0.15, 0.15, 0.15])
    a["mask"] = _pick(rng, BY_NAME["mask"].values, [0.8, 0.1, 0.1])
    a["clothing"] = _pick(rng, BY_NAME["clothing"].values)
    a["background"] = _pick(rng, BY_NAME["background"].values)
    img = {
        "dx": float(rng.uniform(-3, 3)),
        "dy": float(rng.uniform(-3, 3)),
        "hat_colour": int(rng.integers(len(HAT_COLOURS))),
        "hair_style_drawn": a["hair_style"],
        "expression_drawn": a["expression"],
    }
    caption_rng_state = int(rng.integers(2**63))
    # what the drawing hides
    if a["hair_length"] == "bald":
        a["bangs"] = "no"
        a["hair_style"] = None
    if a["hat"] != "none" and a["hair_length"] == "short":
        a["hair_style"] = None  # the cap of short hair is under the hat
    if a["mask"] != "none":
        for k in ("expression", "lipstick", "beard", "moustache"):
            a[k] = None
        img["expression_drawn"] = "neutral"
    full = {c.name: (ident[c.name] if c.identity else a[c.name]) for c in CATEGORIES}
    if full["hair_length"] == "bald":
        full["hair_colour"] = None
    if full["glasses"] == "sunglasses":
        full["eye_colour"] = None
    img["attrs"] = full
    img["identity"] = identity
    img["text_seed"] = caption_rng_state
    return ident, img


# ---------------------------------------------------------------------------------------------
# captions and questions

_OPENINGS = (
    "A close-up portrait of a person with {x}.",
    "This is a headshot of someone with {x}.",
    "The image shows a face with {x}.",
    "A person with {x} looks at the camera.",
    "Pictured is an individual with {x}.",
    "A frontal face photo of a person with {x}.",
)
_FOLLOW = (
    "The person has {x}.",
    "They have {x}.",
    "You can also see {x}.",
    "Other details: {x}.",
    "The face also shows {x}.",
)
_WEARING = ("They are wearing {x}.", "The person wears {x}.", "On them: {x}.")
_SETTING = ("The photo has {x}.", "It is shot against {x}.", "Behind them is {x}.")
_WEARABLES = ("glasses", "hat", "mask", "earrings", "clothing", "lipstick")


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _hair_phrase(a: dict, rng) -> tuple[str, list[str]]:
    """One phrase for the hair: "long wavy blonde hair" (mentions up to three categories)."""
    if a["hair_length"] == "bald":
        return _pick(rng, ("a bald head", "no hair at all", "a shaved bald head")), ["hair_length"]
    words, cats = [], []
    length = {"short": "short", "medium": "shoulder-length", "long": "long"}[a["hair_length"]]
    words.append(length)
    cats.append("hair_length")
    if a["hair_style"] is not None:
        words.append(a["hair_style"])
        cats.append("hair_style")
    if a["hair_colour"] is not None:
        words.append(a["hair_colour"])
        cats.append("hair_colour")
    return " ".join(words) + " hair", cats


def make_caption(attrs: dict, text_seed: int) -> tuple[str, list[str]]:
    """A fine-grained caption and the categories it mentions. Present accessories are always
    mentioned; absent ones ("no glasses") about half of the time; wording, sentence templates and
    how phrases are grouped into sentences vary, the order of the categories does not (hair, then
    the taxonomy's order, what is worn, the background last).

    The fixed order is for the tiny models: trained on captions in shuffled order, a 4-layer
    model's greedy captions were right about what they said (precision 0.96) but kept repeating
    some attributes and never reaching others (recall 0.57 of the reference's mentions)."""
    rng = np.random.Generator(np.random.PCG64(text_seed))
    mentioned: list[str] = []
    body: list[str] = []
    worn: list[str] = []
    hair, hair_cats = _hair_phrase(attrs, rng)
    body.append(hair)
    mentioned += hair_cats
    for c in CATEGORIES:
        if c.name in ("hair_length", "hair_style", "hair_colour", "background"):
            continue
        v = attrs[c.name]
        if v is None:
            continue
        if c.none_value is not None and v == c.none_value and rng.random() < 0.5:
            continue
        phrase = c.words[v]
        if c.name == "expression" and rng.random() < 0.5:
            phrase = {
                "neutral": "a calm, neutral look",
                "smile": "a gentle closed-mouth smile",
                "laugh": "an open-mouthed laugh",
                "surprised": "a look of surprise",
            }[v]
        if c.name == "skin_tone" and rng.random() < 0.5:
            phrase = f"a {v} complexion"
        (worn if c.name in _WEARABLES and v != c.none_value else body).append(phrase)
        mentioned.append(c.name)
    k = int(rng.integers(2, 4))
    sentences = [_pick(rng, _OPENINGS).format(x=_join(body[:k]))]
    rest = body[k:]
    while rest:
        n = int(rng.integers(2, 4))
        sentences.append(_pick(rng, _FOLLOW).format(x=_join(rest[:n])))
        rest = rest[n:]
    if worn:
        sentences.append(_pick(rng, _WEARING).format(x=_join(worn)))
    if rng.random() < 0.85:
        sentences.append(
            _pick(rng, _SETTING).format(x=BY_NAME["background"].words[attrs["background"]])
        )
        mentioned.append("background")
    return " ".join(sentences), mentioned


_YES_NO_OPEN = ("bangs", "moustache", "lipstick", "earrings")
_LENGTH_WORDS = {"bald": "bald", "short": "short", "medium": "shoulder-length", "long": "long"}


def open_answer(category: str, value: str) -> str:
    """The answer to a category's open question: the value itself ("blonde", "smile"), a noun
    phrase for accessories ("round glasses", "no hat"), yes/no where the question is one."""
    c = BY_NAME[category]
    if category in _YES_NO_OPEN:
        return "yes" if value != c.none_value else "no"
    if category == "hair_length":
        return _LENGTH_WORDS[value]
    if category in ("glasses", "beard", "hat", "mask"):
        return c.words[value]
    return value


def _yes_no_question(c, value: str) -> str:
    phrase = c.words[value]
    if c.name in _WEARABLES or c.name == "hat":
        return f"Is the person wearing {phrase}?"
    if c.name == "background":
        return f"Is the background {value}?"
    return f"Does the person have {phrase}?"


def value_answer(category: str, value: str, asked: str) -> str:
    """The answer to "Does the person have <asked>?": what the face has, then the decision
    ("brown, so no"; "curly, so yes"), the way explain-then-answer VQA data reads. A model that
    answered a bare yes/no had to compare the asked value with the image in one token, and a
    60-minute tiny model did not learn to (it said "no" to 1 of 12 "yes" hair-colour questions
    while naming the hair colour right 30/30). Binary categories ("Does the person have bangs?")
    keep a bare yes/no: there the open answer is the decision."""
    decision = "yes" if asked == value else "no"
    if category in _YES_NO_OPEN:
        return decision
    return f"{open_answer(category, value)}, so {decision}"


def make_vqa(attrs: dict, text_seed: int, n: int = 4) -> list[dict]:
    """``n`` question/answer pairs, half open and half yes/no, each about a visible attribute.
    Yes/no questions ask about the true value or another one with equal odds (about another one
    when the attribute is absent, so "Is the person wearing a surgical mask?" is mostly "no", as
    masks mostly are) and are answered by :func:`value_answer` ("brown, so no"); categories with
    an "absent" value also get presence questions ("Is the person wearing any glasses?"),
    answered yes or no."""
    rng = np.random.Generator(np.random.PCG64(text_seed ^ 0x5A5A5A5A))
    visible = [c for c in CATEGORIES if attrs[c.name] is not None]
    chosen = [
        visible[i] for i in rng.choice(len(visible), size=min(n, len(visible)), replace=False)
    ]
    out = []
    for j, c in enumerate(chosen):
        v = attrs[c.name]
        if j % 2 == 0:
            answer = open_answer(c.name, v)
            out.append(
                {"question": c.question, "answer": answer, "type": "open", "attribute": c.name}
            )
        else:
            if c.none_value is not None and rng.random() < 0.35:
                q = (
                    f"Does the person have {c.noun}?"
                    if c.name in ("bangs", "beard", "moustache")
                    else f"Is the person wearing any {c.noun}?"
                )
                out.append(
                    {
                        "question": q,
                        "answer": "yes" if v != c.none_value else "no",
                        "type": "yes_no",
                        "attribute": c.name,
                    }
                )
                continue
            # the true value or another one, half and half: when the other was drawn from all
            # values (the true one included), "Does the person have blue eyes?" was answered yes
            # on ~2/3 of the faces, and a 60-minute model learned to say yes to every such
            # question whatever the image (VQA v2 balances its pairs for the same reason)
            candidates = [x for x in c.values if x not in (c.none_value, v)]
            true = v != c.none_value and (rng.random() < 0.5 or not candidates)
            ask = (
                v if true else _pick(rng, candidates)
            )  # (binary categories: the one present value)
            out.append(
                {
                    "question": _yes_no_question(c, ask),
                    "answer": value_answer(c.name, v, ask),
                    "type": "yes_no",
                    "attribute": c.name,
                    "asked": ask,
                }
            )
    return out


def expected_answer(record: dict, attrs: dict) -> str:
    """The answer a VQA record must carry given the image's attributes (used by the tests and by
    the VQA metric): recomputed from the attribute file, independently of how it was written."""
    c = BY_NAME[record["attribute"]]
    v = attrs[c.name]
    if record["type"] == "yes_no":
        if "asked" in record:
            return value_answer(c.name, v, record["asked"])
        return "yes" if v != c.none_value else "no"
    return open_answer(c.name, v)


# ---------------------------------------------------------------------------------------------
# writing


@dataclass
class SynthFaceConfig:
    num_images: int = 10_000
    seed: int = 0
    size: int = 64
    images_per_identity: int = 8
    vqa_per_image: int = 8  # training rows hold them all (data.vqa_turns): more are nearly free


def _work(args) -> list[tuple]:
    root, cfg, start, stop = args
    out = []
    for i in range(start, stop):
        ident, img = sample_image(cfg.seed, i, cfg.images_per_identity)
        split = split_of_identity(img["identity"])
        rel = f"images/{split}/{i:06d}.png"
        im = render(ident, img, cfg.size)
        im.save(os.path.join(root, rel), format="PNG", compress_level=6)
        caption, mentioned = make_caption(img["attrs"], img["text_seed"])
        vqa = make_vqa(img["attrs"], img["text_seed"], cfg.vqa_per_image)
        out.append((i, split, rel, img["identity"], img["attrs"], caption, mentioned, vqa))
    return out


def draw_image(index: int, seed: int = 0, size: int = 64, images_per_identity: int = 8):
    """(PIL image, attribute dict) of one SynthFace image without writing anything."""
    ident, img = sample_image(seed, index, images_per_identity)
    return render(ident, img, size), img["attrs"]


class _Writer:
    """Record files written to a temp name and moved into place when complete."""

    def __init__(self, root: Path, fmt: str):
        self.root, self.fmt = root, fmt
        self.rows: dict[str, list[dict]] = {}
        self.files: dict[str, object] = {}

    def add(self, name: str, row: dict):
        if self.fmt == "jsonl":
            f = self.files.get(name)
            if f is None:
                f = self.files[name] = open(self.root / f"{name}.jsonl.tmp", "w", encoding="utf-8")
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        else:
            self.rows.setdefault(name, []).append(row)

    def close(self) -> list[str]:
        written = []
        if self.fmt == "jsonl":
            for name, f in self.files.items():
                f.close()
                os.replace(self.root / f"{name}.jsonl.tmp", self.root / f"{name}.jsonl")
                written.append(f"{name}.jsonl")
        else:
            import pyarrow as pa  # heavy to import, and only Parquet output needs it
            import pyarrow.parquet as pq

            for name, rows in self.rows.items():
                # from_pylist takes its columns from the first row: give every row every key
                keys = list(dict.fromkeys(k for r in rows for k in r))
                table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
                tmp = self.root / f"{name}.parquet.tmp"
                pq.write_table(table, tmp)
                os.replace(tmp, self.root / f"{name}.parquet")
                written.append(f"{name}.parquet")
        return sorted(written)


def generate(
    root: str | os.PathLike,
    cfg: SynthFaceConfig | None = None,
    workers: int = 2,
    fmt: str = "jsonl",
    progress: bool = True,
    chunk: int = 250,
) -> dict:
    """Draw ``cfg.num_images`` images with captions, VQA and attributes under ``root``.

    Work is split into chunks of consecutive indices over ``workers`` processes (fork); the parent
    writes the records in index order, so the output does not depend on scheduling. Returns the
    ``meta.json`` content (with ``seconds``, not written to the file so that it stays identical).
    """
    cfg = cfg or SynthFaceConfig()
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"fmt must be 'jsonl' or 'parquet', got {fmt!r}")
    if not 32 <= cfg.size <= 256:
        raise ValueError(f"size must be in [32, 256], got {cfg.size}")
    root = Path(root)
    for s in SPLITS:
        (root / "images" / s).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = [
        (str(root), cfg, a, min(a + chunk, cfg.num_images)) for a in range(0, cfg.num_images, chunk)
    ]
    writer = _Writer(root, fmt)
    counts = {s: 0 for s in SPLITS}
    identities = {s: set() for s in SPLITS}
    n_vqa = 0
    bar = tqdm(total=cfg.num_images, desc="synthface", unit="img", disable=not progress)

    def consume(results):
        nonlocal n_vqa
        for i, split, rel, ident, attrs, caption, mentioned, vqa in results:
            key = f"{i:06d}"
            counts[split] += 1
            identities[split].add(ident)
            writer.add(
                f"captions_{split}",
                {"id": key, "image": rel, "caption": caption, "identity": ident},
            )
            writer.add(
                f"attributes_{split}",
                {
                    "id": key,
                    "image": rel,
                    "identity": ident,
                    "attributes": attrs,
                    "caption_attributes": mentioned,
                },
            )
            for q, pair in enumerate(vqa):
                writer.add(f"vqa_{split}", {"id": f"{key}_{q}", "image": rel, **pair})
                n_vqa += 1
        bar.update(len(results))

    if workers <= 1:
        for job in jobs:
            consume(_work(job))
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            for results in pool.imap(_work, jobs):
                consume(results)
    bar.close()
    files = writer.close()
    meta = {
        "dataset": "SynthFace",
        "version": 1,
        "seed": cfg.seed,
        "size": cfg.size,
        "num_images": cfg.num_images,
        "images_per_identity": cfg.images_per_identity,
        "format": fmt,
        "splits": {s: {"images": counts[s], "identities": len(identities[s])} for s in SPLITS},
        "num_vqa": n_vqa,
        "files": files,
        "taxonomy": taxonomy_dict(),
    }
    tmp = root / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / "meta.json")
    return {**meta, "seconds": time.perf_counter() - t0}


def _draw_chunk(args):
    seed, size, per_identity, start, stop = args
    imgs, labels, idents = [], [], []
    for i in range(start, stop):
        ident, img = sample_image(seed, i, per_identity)
        imgs.append(np.asarray(render(ident, img, size), dtype=np.uint8))
        labels.append(encode_attributes(img["attrs"]))
        idents.append(img["identity"])
    return imgs, labels, idents


def draw_arrays(
    num_images: int,
    seed: int,
    size: int = 64,
    images_per_identity: int = 8,
    workers: int = 2,
    split: str | None = None,
    progress: bool = False,
):
    """Draw SynthFace images straight into memory (no files): a
    :class:`unif2ace.data.readers.FaceArrays`. With ``split``, only images of that split's
    identities are kept (``num_images`` counts the drawn images before that filter)."""
    chunk = 250
    jobs = [
        (seed, size, images_per_identity, a, min(a + chunk, num_images))
        for a in range(0, num_images, chunk)
    ]
    imgs, labels, idents = [], [], []
    bar = tqdm(total=num_images, desc=f"draw seed={seed}", disable=not progress, unit="img")
    if workers <= 1:
        results = map(_draw_chunk, jobs)
        pool = None
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers)
        results = pool.imap(_draw_chunk, jobs)
    for a, b, c in results:
        imgs += a
        labels += b
        idents += c
        bar.update(len(a))
    bar.close()
    if pool is not None:
        pool.close()
        pool.join()
    idx = np.arange(num_images)
    identities = np.array(idents, dtype=np.int64)
    if split is not None:
        keep = np.array([split_of_identity(int(j)) == split for j in identities], dtype=bool)
        idx = idx[keep]
    return FaceArrays(
        images=np.stack(imgs)[idx],
        labels=np.array(labels, dtype=np.int64)[idx],
        identities=identities[idx],
        ids=[f"{i:06d}" for i in idx],
    )
