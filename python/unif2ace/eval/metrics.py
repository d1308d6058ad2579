"""Evaluation metrics on SynthFace (DESIGN §9): caption attribute precision/recall (our Desc-GPT
analogue), VQA exact match, generation attribute accuracy by the judge (our VQAScore analogue) with
its chance levels, and the Fréchet distance between feature sets (FID in judge-feature space).

Attribute values are the taxonomy's machine values (``"blonde"``, ``"medium"``, ``"cap"``...) and,
as arrays, their integer codes from :func:`unif2ace.data.taxonomy.encode_attributes` — the codes
the judge is trained on and :func:`unif2ace.eval.judge.judge_predict` returns (-1 = hidden /
not specified).

Everything here is numpy / pure Python (no torch), float64 where it computes.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np

from unif2ace.data.taxonomy import (
    BY_NAME,
    CATEGORIES,
    CATEGORY_NAMES,
    NUM_VALUES,
    encode_attributes,
)

# ---------------------------------------------------------------------------------------------
# caption parsing: the inverse of synthface.make_caption

# hair is one phrase "long wavy blonde hair" carrying up to three categories; each modifier word
# maps to (category, value). Spelling variants a model may produce are accepted as synonyms.
_HAIR_WORDS: dict[str, tuple[str, str]] = {
    "short": ("hair_length", "short"),
    "shoulder-length": ("hair_length", "medium"),
    "shoulder length": ("hair_length", "medium"),
    "medium-length": ("hair_length", "medium"),
    "medium length": ("hair_length", "medium"),
    "medium": ("hair_length", "medium"),
    "long": ("hair_length", "long"),
    **{v: ("hair_style", v) for v in BY_NAME["hair_style"].values},
    **{v: ("hair_colour", v) for v in BY_NAME["hair_colour"].values},
    "blond": ("hair_colour", "blonde"),
    "gray": ("hair_colour", "grey"),
}
# longest first so that "shoulder-length" wins over a shorter alternative at the same position
_HAIR_ALT = "|".join(re.escape(w) for w in sorted(_HAIR_WORDS, key=len, reverse=True))
_HAIR_RE = re.compile(rf"\b((?:(?:{_HAIR_ALT})[\s,]+)+)hair\b")
_HAIR_WORD_RE = re.compile(rf"\b(?:{_HAIR_ALT})\b")


def _alt(values) -> str:
    return "|".join(re.escape(v) for v in values)


def _value_patterns() -> list[tuple[str, str, re.Pattern]]:
    """(category, value, regex) for every phrase make_caption can write, plus close variants.
    Overlapping matches are resolved longest-first, so "no bangs" beats "bangs", "no face mask"
    beats nothing else, "a full beard" is one phrase."""
    p: list[tuple[str, str, str]] = []
    add = lambda cat, val, rx: p.append((cat, val, rx))
    for v in BY_NAME["face_shape"].values:
        add("face_shape", v, rf"\b{v}[\s-]+(?:face|faced)\b")
    for v in BY_NAME["skin_tone"].values:
        add("skin_tone", v, rf"\b{v}[\s-]+(?:skin|skinned|complexion)\b")
    for v in BY_NAME["eye_colour"].values:
        add("eye_colour", v, rf"\b{v}[\s-]+eyes?\b")
    for v in BY_NAME["eyebrows"].values:
        add("eyebrows", v, rf"\b{v}[\s-]+(?:eye)?brows?\b")
    add("hair_length", "bald", r"\bbald\b|\bno hair\b|\bshaved head\b")
    add("bangs", "no", r"\bno (?:bangs|fringe)\b")
    add("bangs", "yes", r"\b(?:bangs|fringe)\b")
    add("glasses", "none", r"\bno (?:glasses|eyeglasses|spectacles)\b")
    add("glasses", "round", r"\bround[\s-]+(?:glasses|eyeglasses|spectacles)\b")
    add("glasses", "square", r"\bsquare[\s-]+(?:glasses|eyeglasses|spectacles)\b")
    add("glasses", "sunglasses", r"\bsunglasses\b|\bsun glasses\b")
    add("beard", "none", r"\bno beard\b|\bclean[\s-]+shaven\b")
    add("beard", "stubble", r"\bstubble\b|\bstubbly\b")
    add("beard", "goatee", r"\bgoatee\b")
    add("beard", "full", r"\bfull beard\b")
    add("moustache", "no", r"\bno (?:moustache|mustache)\b")
    add("moustache", "yes", r"\b(?:moustache|mustache)\b")
    add("expression", "neutral", r"\bneutral\b|\bcalm\b")
    add("expression", "smile", r"\bsmil(?:e|es|ing)\b")
    add("expression", "laugh", r"\blaugh(?:s|ing)?\b")
    add("expression", "surprised", r"\bsurprised?\b")
    add("lipstick", "none", r"\bno lipstick\b")
    add("lipstick", "red", r"\blipstick\b")  # the only colour there is
    add("earrings", "none", r"\bno (?:earrings?|hoops?)\b")
    add("earrings", "hoops", r"\bearrings?\b|\bhoops?\b")
    add("hat", "none", r"\bno (?:hat|headwear)\b")
    add("hat", "cap", r"\b(?:baseball )?cap\b")
    add("hat", "beanie", r"\bbeanie\b")
    add("hat", "fedora", r"\bfedora\b")
    add("mask", "none", r"\bno (?:face )?mask\b")
    add("mask", "surgical", r"\b(?:light blue )?surgical(?: face)?(?: mask)?\b")
    add("mask", "black", r"\bblack (?:face )?mask\b")
    add(
        "clothing",
        "",  # value taken from group 1
        rf"\b({_alt(BY_NAME['clothing'].values)})[\s-]+(?:shirt|t-shirt|top)\b",
    )
    add(
        "background",
        "",
        rf"\b({_alt(BY_NAME['background'].values)}|gray)[\s-]+(?:background|backdrop)\b",
    )
    return [(c, v, re.compile(rx)) for c, v, rx in p]


_PATTERNS = _value_patterns()
_SYNONYM = {"gray": "grey"}


def parse_caption(text: str) -> dict[str, str | None]:
    """Attribute values a caption mentions: ``{category: value}`` in taxonomy machine values.

    Inverts every phrasing of :func:`unif2ace.data.synthface.make_caption` (the hair phrase
    "long wavy blonde hair" → hair_length/hair_style/hair_colour; "a gentle closed-mouth smile" →
    expression=smile; "a tan complexion" → skin_tone=tan; "no hat" → hat=none...), case-insensitive,
    with a few spelling variants (blond, gray, mustache). Categories not mentioned are absent.

    A category mentioned with two different values (a garbled or self-contradicting caption) maps
    to ``None``: it counts as a mention that is never correct, so listing every value cannot score.
    Overlapping phrases are resolved longest-first ("no bangs" over "bangs"). Never raises: a
    non-string gives ``{}``.
    """
    if not isinstance(text, str) or not text:
        return {}
    t = text.lower()
    found: list[tuple[int, int, str, str]] = []  # (start, end, category, value)
    for m in _HAIR_RE.finditer(t):
        a, b = m.span(1)
        for w in _HAIR_WORD_RE.finditer(t, a, b):
            cat, val = _HAIR_WORDS[w.group(0)]
            found.append((w.start(), m.end(), cat, val))
        # the whole phrase claims its span so that "red" of "red hair" is not read elsewhere
        found.append((m.start(), m.end(), "", ""))
    for cat, val, rx in _PATTERNS:
        for m in rx.finditer(t):
            v = val or _SYNONYM.get(m.group(1), m.group(1))
            found.append((m.start(), m.end(), cat, v))
    # longest match first; a match overlapping an accepted longer one is dropped. The hair
    # modifiers share their phrase's end, so they are accepted together with it.
    found.sort(key=lambda f: (-(f[1] - f[0]), f[0]))
    taken: list[tuple[int, int]] = []
    hair_phrases: list[tuple[int, int]] = []
    out: dict[str, str | None] = {}
    seen: dict[str, set[str]] = {}
    for s, e, cat, val in found:
        if cat == "":
            hair_phrases.append((s, e))
            taken.append((s, e))
            continue
        inside_hair = cat.startswith("hair_") and any(
            hs <= s and e == he for hs, he in hair_phrases
        )
        if not inside_hair and any(s < te and ts < e for ts, te in taken):
            continue
        if not inside_hair:
            taken.append((s, e))
        seen.setdefault(cat, set()).add(val)
    for c in CATEGORY_NAMES:
        if c in seen:
            vals = seen[c]
            out[c] = next(iter(vals)) if len(vals) == 1 else None
    return out


# ---------------------------------------------------------------------------------------------
# caption attribute precision / recall (Desc-GPT analogue)


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def caption_scores(
    pred_texts: Sequence[str],
    attrs: Sequence[dict],
    reference: Sequence[Sequence[str] | str] | None = None,
) -> dict:
    """Attribute-level precision, recall and F1 of predicted captions, micro-averaged over all
    (image, category) pairs, plus the same per category.

    For image ``i`` let ``M_i`` be the categories ``parse_caption(pred_texts[i])`` mentions and
    ``R_i`` the reference set. A mention is *correct* when its value equals ``attrs[i][c]`` (a
    mention of a hidden attribute — eye colour behind sunglasses — or a contradictory one is wrong)::

        precision = Σ_i |{c ∈ M_i : correct}| / Σ_i |M_i|
        recall    = Σ_i |{c ∈ R_i : c ∈ M_i and correct}| / Σ_i |R_i|
        f1        = 2 P R / (P + R)

    **Recall is against what the ground-truth caption mentions**: ``reference[i]`` is either the
    category list make_caption returns as its second value (``caption_attributes`` in the
    attribute file) or a reference caption string, parsed with :func:`parse_caption`. A correct
    mention outside ``R_i`` ("no hat" where the reference did not say it) helps precision only.
    With ``reference=None`` recall falls back to *all visible categories* of ``attrs[i]`` (harder:
    make_caption leaves out about half of the absent accessories); ``recall_against`` says which.

    ``attrs[i]`` are attribute dicts in machine values (None = hidden). With no mention at all the
    precision is 0/0, reported as 0 with ``mentioned == 0``; ``no_mentions`` counts captions that
    mention nothing (empty or unreadable). Returns ``{"precision", "recall", "f1", "n",
    "mentioned", "correct", "reference", "recalled", "no_mentions", "recall_against",
    "per_category": {name: {precision, recall, f1, mentioned, correct, reference, recalled}}}``.
    """
    if len(pred_texts) != len(attrs):
        raise ValueError(f"{len(pred_texts)} captions for {len(attrs)} attribute records")
    if reference is not None and len(reference) != len(attrs):
        raise ValueError(f"{len(reference)} references for {len(attrs)} attribute records")
    zero = {"mentioned": 0, "correct": 0, "reference": 0, "recalled": 0}
    per = {c: dict(zero) for c in CATEGORY_NAMES}
    no_mentions = 0
    for i, (text, gold) in enumerate(zip(pred_texts, attrs)):
        pred = parse_caption(text)
        if not pred:
            no_mentions += 1
        if reference is None:
            ref = {c for c in CATEGORY_NAMES if gold.get(c) is not None}
        elif isinstance(reference[i], str):
            ref = set(parse_caption(reference[i]))
        else:
            ref = set(reference[i])
        for c, v in pred.items():
            ok = v is not None and gold.get(c) == v
            per[c]["mentioned"] += 1
            per[c]["correct"] += int(ok)
        for c in ref:
            if c not in per:
                continue
            per[c]["reference"] += 1
            per[c]["recalled"] += int(pred.get(c) is not None and pred.get(c) == gold.get(c))
    tot = {k: sum(p[k] for p in per.values()) for k in zero}
    out_per = {}
    for c, p in per.items():
        pr, rc = _ratio(p["correct"], p["mentioned"]), _ratio(p["recalled"], p["reference"])
        out_per[c] = {"precision": pr, "recall": rc, "f1": _f1(pr, rc), **p}
    pr, rc = _ratio(tot["correct"], tot["mentioned"]), _ratio(tot["recalled"], tot["reference"])
    return {
        "precision": pr,
        "recall": rc,
        "f1": _f1(pr, rc),
        "n": len(attrs),
        **tot,
        "no_mentions": no_mentions,
        "recall_against": "visible" if reference is None else "reference",
        "per_category": out_per,
    }


# ---------------------------------------------------------------------------------------------
# VQA exact match

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation → space, drop the articles a/an/the, collapse whitespace
    ("A light-blue surgical mask." → "light blue surgical mask"). Non-strings give ``""``."""
    if not isinstance(text, str):
        return ""
    t = _PUNCT.sub(" ", text.lower())
    t = _ARTICLES.sub(" ", t)
    return " ".join(t.split())


def vqa_accuracy(
    pred: Sequence[str], gold: Sequence[str], types: Sequence[str] | None = None
) -> dict:
    """Exact-match accuracy after :func:`normalize_answer`, overall and, with ``types`` (the VQA
    records' ``type``: ``"yes_no"`` / ``"open"``), per type.

    Returns ``{"accuracy", "n", "correct", "per_type": {type: {"accuracy", "n", "correct"}}}``
    (``per_type`` empty without ``types``; accuracy 0 when ``n == 0``). ``"yes_no"`` also gets
    ``"decision_accuracy"``: the last word alone (SynthFace answers "brown, so no"; exact match
    needs the value too).
    """
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} answers")
    if types is not None and len(types) != len(gold):
        raise ValueError(f"{len(types)} types for {len(gold)} answers")
    pn, gn = [normalize_answer(p) for p in pred], [normalize_answer(g) for g in gold]
    hits = [p == g for p, g in zip(pn, gn)]
    per: dict[str, dict] = {}
    if types is not None:
        for t, h, p, g in zip(types, hits, pn, gn):
            d = per.setdefault(str(t), {"n": 0, "correct": 0})
            d["n"] += 1
            d["correct"] += int(h)
            if t == "yes_no":
                d["decision_correct"] = d.get("decision_correct", 0) + int(
                    p.split()[-1:] == g.split()[-1:]
                )
        for d in per.values():
            d["accuracy"] = _ratio(d["correct"], d["n"])
            if "decision_correct" in d:
                d["decision_accuracy"] = _ratio(d["decision_correct"], d["n"])
    return {
        "accuracy": _ratio(sum(hits), len(hits)),
        "n": len(hits),
        "correct": int(sum(hits)),
        "per_type": per,
    }


# ---------------------------------------------------------------------------------------------
# generation attribute accuracy (VQAScore analogue) and chance levels


def encode_targets(
    attrs: Sequence[dict], mentioned: Sequence[Sequence[str]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Prompt attributes → ``(targets int64 [N, C], mask bool [N, C])`` in the judge's codes
    (:func:`~unif2ace.data.taxonomy.encode_attributes`, CATEGORIES order, -1 hidden).

    ``attrs`` may be full attribute dicts or ``parse_caption(prompt)`` outputs. ``mask`` is
    ``targets >= 0``, further restricted to ``mentioned[i]`` (e.g. make_caption's category list)
    when given. Values outside the taxonomy (a contradictory parse gives None) are -1."""
    n, C = len(attrs), len(CATEGORIES)
    targets = np.full((n, C), -1, dtype=np.int64)
    for i, a in enumerate(attrs):
        clean = {k: v for k, v in a.items() if k in BY_NAME and v in BY_NAME[k].values}
        targets[i] = encode_attributes(clean)
    mask = targets >= 0
    if mentioned is not None:
        if len(mentioned) != n:
            raise ValueError(f"{len(mentioned)} mention lists for {n} records")
        keep = np.zeros((n, C), dtype=bool)
        for i, cats in enumerate(mentioned):
            for c in cats:
                if c in BY_NAME:
                    keep[i, CATEGORY_NAMES.index(c)] = True
        mask &= keep
    return targets, mask


def _check_codes(name: str, a: np.ndarray, n: int | None = None) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[1] != len(CATEGORIES):
        raise ValueError(f"{name} must be [N, {len(CATEGORIES)}], got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} rows, expected {n}")
    return a.astype(np.int64, copy=False)


def generation_accuracy(
    judge_pred: np.ndarray, target_attrs: np.ndarray, mask: np.ndarray | None = None
) -> dict:
    """Judge accuracy on generated images against the prompts' attributes.

    ``judge_pred`` ``int [N, C]`` (:func:`unif2ace.eval.judge.judge_predict`), ``target_attrs``
    ``int [N, C]`` in the same codes (-1 = not specified), ``mask`` ``bool [N, C]`` = the
    attributes the prompt mentions (None: every ``target >= 0``; entries with target -1 are never
    scored). Per category ``acc_c = mean over scored images of [pred == target]``; ``mean`` is the
    mean of ``acc_c`` over categories with at least one scored image (the headline number),
    ``micro`` the accuracy over all scored (image, category) pairs.

    Returns ``{"mean", "micro", "n_scored", "per_category": {name: {"accuracy", "n"}}}``.
    """
    target = _check_codes("target_attrs", target_attrs)
    pred = _check_codes("judge_pred", judge_pred, target.shape[0])
    valid = target >= 0
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != target.shape:
            raise ValueError(f"mask shape {mask.shape} != target shape {target.shape}")
        valid &= mask
    hit = (pred == target) & valid
    per = {}
    for c, name in enumerate(CATEGORY_NAMES):
        n = int(valid[:, c].sum())
        if n:
            per[name] = {"accuracy": float(hit[:, c].sum() / n), "n": n}
    total = int(valid.sum())
    return {
        "mean": float(np.mean([p["accuracy"] for p in per.values()])) if per else 0.0,
        "micro": _ratio(int(hit.sum()), total),
        "n_scored": total,
        "per_category": per,
    }


def chance_levels(
    train_labels: np.ndarray,
    target_attrs: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> dict:
    """Chance levels for :func:`generation_accuracy`, per category and averaged the same way.

    - *majority*: accuracy of always predicting the category's most frequent value in
      ``train_labels`` (``int [N, C]``, e.g. ``FaceArrays.labels`` of the train split; -1 hidden
      entries are ignored), measured on ``target_attrs``/``mask`` when given (the prompts being
      scored), else on the train labels themselves.
    - *uniform*: expected accuracy of a uniform guess over the category's values, ``1 / K_c``.

    Returns ``{"majority_mean", "uniform_mean", "majority_micro", "per_category": {name:
    {"majority_value", "majority", "uniform"}}}`` where the means are over the categories
    generation_accuracy would score (those with a scored entry) and ``majority_micro`` pools all
    scored pairs.
    """
    train = _check_codes("train_labels", train_labels)
    const = np.full(len(CATEGORIES), -1, dtype=np.int64)
    for c, k in enumerate(NUM_VALUES):
        col = train[:, c]
        col = col[(col >= 0) & (col < k)]
        if col.size:
            const[c] = int(np.bincount(col, minlength=k).argmax())
    eval_t = train if target_attrs is None else _check_codes("target_attrs", target_attrs)
    pred = np.broadcast_to(const, eval_t.shape)
    acc = generation_accuracy(pred, eval_t, mask)
    per = {}
    for c, cat in enumerate(CATEGORIES):
        if cat.name not in acc["per_category"]:
            continue
        per[cat.name] = {
            "majority_value": cat.values[const[c]] if const[c] >= 0 else None,
            "majority": acc["per_category"][cat.name]["accuracy"],
            "uniform": 1.0 / len(cat.values),
        }
    return {
        "majority_mean": acc["mean"],
        "uniform_mean": float(np.mean([p["uniform"] for p in per.values()])) if per else 0.0,
        "majority_micro": acc["micro"],
        "per_category": per,
    }


# ---------------------------------------------------------------------------------------------
# Fréchet distance


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition (negative
    rounding-noise eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((a + a.T) * 0.5)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _moments(feats: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must be [N, F] with N >= 2, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N_a, F]``, ``[N_b, F]``::

        d² = ‖μ_a − μ_b‖² + tr Σ_a + tr Σ_b − 2 tr (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2}

    (sample covariances, ddof=1). ``tr (Σ_a Σ_b)^{1/2}`` is computed through the symmetric PSD
    matrix ``Σ_a^{1/2} Σ_b Σ_a^{1/2}`` (same eigenvalues as ``Σ_a Σ_b``) with ``eigh`` only, all in
    float64, so rank-deficient covariances (N < F) are fine and no complex parts appear. Returns
    ``d²`` (the quantity FID reports), clipped at 0 against rounding.
    """
    mu_a, cov_a = _moments(feats_a, "feats_a")
    mu_b, cov_b = _moments(feats_b, "feats_b")
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dims differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    s = _sqrt_psd(cov_a)
    m = s @ cov_b @ s
    eig = np.linalg.eigvalsh((m + m.T) * 0.5)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu_a - mu_b
    d = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean)
    return max(d, 0.0)
