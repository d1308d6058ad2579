"""Evaluation metrics: caption parsing (the inverse of make_caption) and attribute P/R/F1, VQA exact
match, judge generation accuracy and chance levels, Fréchet distance, judge features. Records are
sampled in memory (no images drawn, nothing written)."""

import numpy as np
import pytest
import torch

from unif2ace.data.synthface import expected_answer, make_caption, make_vqa, sample_image
from unif2ace.data.taxonomy import BY_NAME, CATEGORIES, CATEGORY_NAMES, NUM_VALUES
from unif2ace.eval.judge import AttributeJudge, judge_features
from unif2ace.eval.metrics import (
    caption_scores,
    chance_levels,
    encode_targets,
    frechet_distance,
    generation_accuracy,
    normalize_answer,
    parse_caption,
    vqa_accuracy,
)

N_RECORDS = 300


@pytest.fixture(scope="module")
def records():
    out = []
    for i in range(N_RECORDS):
        _, img = sample_image(5, i, 4)
        caption, mentioned = make_caption(img["attrs"], img["text_seed"])
        out.append((img["attrs"], caption, mentioned, img["text_seed"]))
    return out


# ---------------------------------------------------------------------------------------------
# parse_caption


def test_parse_inverts_make_caption(records):
    for attrs, caption, mentioned, _ in records:
        assert parse_caption(caption) == {c: attrs[c] for c in mentioned}, caption


def test_parse_covers_every_value_and_variant():
    # every value of every category, through make_caption's phrase or its alternative wording
    for c in CATEGORIES:
        for v in c.values:
            assert parse_caption(f"A person with {c.words[v]}.").get(c.name) == v, (c.name, v)
    variants = {
        "a calm, neutral look": ("expression", "neutral"),
        "a gentle closed-mouth smile": ("expression", "smile"),
        "an open-mouthed laugh": ("expression", "laugh"),
        "a look of surprise": ("expression", "surprised"),
        "a tan complexion": ("skin_tone", "tan"),
        "no hair at all": ("hair_length", "bald"),
        "a shaved bald head": ("hair_length", "bald"),
        "Gray hair": ("hair_colour", "grey"),
        "a MUSTACHE": ("moustache", "yes"),
    }
    for text, (cat, val) in variants.items():
        assert parse_caption(text) == {cat: val}, text
    several = {
        "long wavy blonde hair": "hair_length=long hair_style=wavy hair_colour=blonde",
        "shoulder-length curly red hair, a red shirt and red lipstick": (
            "hair_length=medium hair_style=curly hair_colour=red lipstick=red clothing=red"
        ),
        # same words in other categories' phrases are not confused
        "a round face, square glasses, a light blue surgical mask": (
            "face_shape=round glasses=square mask=surgical"
        ),
        "no bangs, no face mask, sunglasses": "bangs=no mask=none glasses=sunglasses",
    }
    for text, want in several.items():
        assert parse_caption(text) == dict(kv.split("=") for kv in want.split()), text


def test_parse_contradiction_and_repetition():
    assert parse_caption("blue eyes. blue eyes. blue eyes") == {"eye_colour": "blue"}
    assert parse_caption("blue eyes and green eyes") == {"eye_colour": None}
    assert parse_caption("long hair, short hair") == {"hair_length": None}


@pytest.mark.parametrize(
    "text",
    ["", " ", "hair", "hair hair hair", "no", ",,,,", "\x00\uffff", "é" * 50, "a " * 2000, None, 3],
)
def test_parse_never_raises(text):
    assert isinstance(parse_caption(text), dict)


def test_parse_truncated_and_garbled_is_never_wrong(records):
    # every prefix of a true caption: what it still mentions is right (no half-word misreads)
    rng = np.random.default_rng(0)
    for attrs, caption, _, _ in records[:12]:
        for k in range(len(caption) + 1):
            for c, v in parse_caption(caption[:k]).items():
                assert v == attrs[c], (caption[:k], c, v)
        words = caption.split()
        for _ in range(10):  # shuffled words + random junk: must not raise
            junk = [words[j] for j in rng.integers(0, len(words), size=len(words))]
            parse_caption(" ".join(junk) + " " + caption[: rng.integers(0, len(caption))])


# ---------------------------------------------------------------------------------------------
# caption_scores


def test_caption_scores_ground_truth_is_perfect(records):
    attrs = [r[0] for r in records]
    caps = [r[1] for r in records]
    for reference in ([r[2] for r in records], caps):
        s = caption_scores(caps, attrs, reference)
        assert s["precision"] == s["recall"] == s["f1"] == 1.0
        assert s["recall_against"] == "reference" and s["no_mentions"] == 0
        assert s["mentioned"] == s["reference"] == sum(len(r[2]) for r in records)
        assert s["mentioned"] / len(records) >= 10  # fine-grained: ≥ 10 attributes per caption
        for c, p in s["per_category"].items():
            if p["mentioned"]:
                assert p["precision"] == p["recall"] == 1.0, c
    # against every visible category recall drops (absent accessories are often not mentioned)
    s = caption_scores(caps, attrs)
    assert s["recall_against"] == "visible" and s["precision"] == 1.0 and s["recall"] < 1.0


def test_caption_scores_one_swap(records):
    attrs = [r[0] for r in records]
    caps = [r[1] for r in records]
    ref = [r[2] for r in records]
    # swap the eye colour of the first caption that states it
    i = next(j for j, r in enumerate(records) if "eye_colour" in r[2])
    true = attrs[i]["eye_colour"]
    other = next(v for v in BY_NAME["eye_colour"].values if v != true)
    bad = list(caps)
    bad[i] = caps[i].replace(f"{true} eyes", f"{other} eyes")
    assert parse_caption(bad[i])["eye_colour"] == other
    m = sum(len(r) for r in ref)
    s = caption_scores(bad, attrs, ref)
    assert s["precision"] == pytest.approx((m - 1) / m, abs=1e-12)
    assert s["recall"] == pytest.approx((m - 1) / m, abs=1e-12)
    eye = s["per_category"]["eye_colour"]
    assert eye["correct"] == eye["mentioned"] - 1 and eye["recalled"] == eye["reference"] - 1
    # on that one image: precision drops by exactly one mention out of its len(ref[i])
    one = caption_scores([bad[i]], [attrs[i]], [ref[i]])
    assert one["precision"] == pytest.approx(1 - 1 / len(ref[i]), abs=1e-12)


def test_caption_scores_empty_and_bad_input(records):
    attrs = [r[0] for r in records[:5]]
    s = caption_scores([""] * 5, attrs, [r[2] for r in records[:5]])
    assert s["precision"] == 0.0 and s["mentioned"] == 0 and s["no_mentions"] == 5
    assert s["recall"] == 0.0 and s["f1"] == 0.0 and s["reference"] > 0
    # half empty, half perfect: precision 1 over what was said, recall halves-ish
    caps = ["", records[1][1], "", records[3][1], ""]
    s = caption_scores(caps, attrs, [r[2] for r in records[:5]])
    assert s["precision"] == 1.0 and s["no_mentions"] == 3 and 0 < s["recall"] < 1
    with pytest.raises(ValueError):
        caption_scores(["x"], attrs)
    with pytest.raises(ValueError):
        caption_scores([""] * 5, attrs, [[]])


def test_caption_scores_hidden_mention_is_wrong():
    _, img = next(
        x
        for x in (sample_image(5, i, 4) for i in range(500))
        if x[1]["attrs"]["eye_colour"] is None
    )
    s = caption_scores(["A person with blue eyes."], [img["attrs"]], [[]])
    assert s["mentioned"] == 1 and s["correct"] == 0 and s["precision"] == 0.0


# ---------------------------------------------------------------------------------------------
# VQA


def test_normalize_answer():
    assert normalize_answer("  A Light-blue surgical MASK. ") == "light blue surgical mask"
    assert normalize_answer("The shoulder-length") == normalize_answer("shoulder length")
    assert normalize_answer("Yes!") == "yes"
    assert normalize_answer(None) == ""


def test_vqa_accuracy(records):
    pairs = [(q, attrs) for attrs, _, _, seed in records[:100] for q in make_vqa(attrs, seed)]
    gold = [q["answer"] for q, _ in pairs]
    types = [q["type"] for q, _ in pairs]
    truth = [expected_answer(q, a) for q, a in pairs]
    s = vqa_accuracy([f" The {t.upper()}." for t in truth], gold, types)
    assert s["accuracy"] == 1.0 and s["n"] == len(gold)
    assert set(s["per_type"]) == {"open", "yes_no"}
    assert sum(d["n"] for d in s["per_type"].values()) == len(gold)
    assert s["per_type"]["yes_no"]["decision_accuracy"] == 1.0
    # flip every yes/no decision ("brown, so no" -> "brown, so yes"): yes/no accuracy 0, open 1
    flip = {"yes": "no", "no": "yes"}
    flipped = [
        (g[: g.rindex(g.split()[-1])] + flip[g.split()[-1]] if t == "yes_no" else g)
        for g, t in zip(gold, types)
    ]
    assert any("so" in g.split() for g in flipped)  # the explained form is among them
    s = vqa_accuracy(flipped, gold, types)
    assert s["per_type"]["yes_no"]["accuracy"] == 0.0 and s["per_type"]["open"]["accuracy"] == 1.0
    assert s["per_type"]["yes_no"]["decision_accuracy"] == 0.0
    # the right decision with a wrong value: not an exact match, a right decision
    yn = [g for g, t in zip(gold, types) if g.endswith(", so no")]
    s2 = vqa_accuracy(["zzz, so no" for _ in yn], yn, ["yes_no"] * len(yn))
    assert s2["accuracy"] == 0.0 and s2["per_type"]["yes_no"]["decision_accuracy"] == 1.0
    n_open = s["per_type"]["open"]["n"]
    assert s["accuracy"] == pytest.approx(n_open / len(gold))
    assert vqa_accuracy(["a"], ["b"])["per_type"] == {}
    assert vqa_accuracy([], [])["accuracy"] == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy(["yes"], ["yes", "no"])
    with pytest.raises(ValueError):
        vqa_accuracy(["yes"], ["yes"], ["open", "open"])


# ---------------------------------------------------------------------------------------------
# generation accuracy and chance levels


def test_encode_targets_uses_judge_codes(records):
    attrs = [r[0] for r in records[:20]]
    t, m = encode_targets(attrs)
    for i, a in enumerate(attrs):
        for c, name in enumerate(CATEGORY_NAMES):
            v = a[name]
            assert t[i, c] == (-1 if v is None else BY_NAME[name].values.index(v))
    assert (m == (t >= 0)).all()
    t2, m2 = encode_targets([parse_caption(r[1]) for r in records[:20]])
    t3, m3 = encode_targets(attrs, [r[2] for r in records[:20]])
    assert (m2 == m3).all() and (t2[m2] == t3[m3]).all()
    # a contradictory parse (None) is not a target
    t4, m4 = encode_targets([{"eye_colour": None, "hat": "beanie"}])
    assert not m4[0, CATEGORY_NAMES.index("eye_colour")] and m4.sum() == 1


def test_generation_accuracy():
    rng = np.random.default_rng(1)
    N, C = 257, len(CATEGORIES)
    target = np.stack([rng.integers(0, k, N) for k in NUM_VALUES], 1)
    target[rng.random((N, C)) < 0.1] = -1
    mask = rng.random((N, C)) < 0.7
    s = generation_accuracy(target.clip(0), target, mask)
    assert s["mean"] == s["micro"] == 1.0
    assert s["n_scored"] == int((mask & (target >= 0)).sum())
    # wrong on exactly one category -> that category 0, mean drops by 1/C
    pred = target.clip(0).copy()
    j = CATEGORY_NAMES.index("hat")
    pred[:, j] = (pred[:, j] + 1) % NUM_VALUES[j]
    s = generation_accuracy(pred, target, mask)
    assert s["per_category"]["hat"]["accuracy"] == 0.0
    assert s["mean"] == pytest.approx(1 - 1 / C)
    # against a loop reference on random predictions
    pred = np.stack([rng.integers(0, k, N) for k in NUM_VALUES], 1)
    s = generation_accuracy(pred, target, mask)
    for c, name in enumerate(CATEGORY_NAMES):
        sel = [i for i in range(N) if mask[i, c] and target[i, c] >= 0]
        ref = sum(pred[i, c] == target[i, c] for i in sel) / len(sel)
        assert s["per_category"][name]["accuracy"] == pytest.approx(ref)
        assert s["per_category"][name]["n"] == len(sel)
    # no mask: every target >= 0 is scored; unscored categories are left out of the mean
    t = target.copy()
    t[:, 0] = -1
    s = generation_accuracy(pred, t)
    assert CATEGORY_NAMES[0] not in s["per_category"] and len(s["per_category"]) == C - 1
    with pytest.raises(ValueError):
        generation_accuracy(pred[:, :3], target)
    with pytest.raises(ValueError):
        generation_accuracy(pred[:10], target)
    with pytest.raises(ValueError):
        generation_accuracy(pred, target, mask[:, :3])


def test_chance_levels(records):
    train, _ = encode_targets([r[0] for r in records])
    ch = chance_levels(train)
    for c, name in enumerate(CATEGORY_NAMES):
        col = train[:, c][train[:, c] >= 0]
        counts = np.bincount(col, minlength=NUM_VALUES[c])
        p = ch["per_category"][name]
        assert p["majority"] == pytest.approx(counts.max() / counts.sum())
        assert p["majority_value"] == BY_NAME[name].values[counts.argmax()]
        assert p["uniform"] == pytest.approx(1 / NUM_VALUES[c])
    assert ch["per_category"]["hat"]["majority_value"] == "none"
    assert ch["uniform_mean"] == pytest.approx(np.mean([1 / k for k in NUM_VALUES]))
    # measured on the prompts being scored: equals generation_accuracy of the constant guess
    targets, mask = encode_targets([r[0] for r in records[:100]], [r[2] for r in records[:100]])
    ch2 = chance_levels(train, targets, mask)
    const = np.array(
        [BY_NAME[n].values.index(ch["per_category"][n]["majority_value"]) for n in CATEGORY_NAMES]
    )
    ref = generation_accuracy(np.tile(const, (100, 1)), targets, mask)
    assert ch2["majority_mean"] == pytest.approx(ref["mean"])
    assert ch2["majority_micro"] == pytest.approx(ref["micro"])


# ---------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_closed_form_diagonal():
    rng = np.random.default_rng(2)
    F = 23
    za, zb = rng.standard_normal((4001, F)), rng.standard_normal((3001, F))

    # whiten the samples so that their sample moments are exactly the chosen ones
    def exact(z, mu, sd):
        z = z - z.mean(0)
        w, v = np.linalg.eigh(np.cov(z, rowvar=False))
        z = z @ v @ np.diag(w**-0.5) @ v.T
        return mu + z * sd

    mu_a, mu_b = rng.normal(size=F), rng.normal(size=F)
    sd_a, sd_b = rng.uniform(0.2, 3, F), rng.uniform(0.2, 3, F)
    a, b = exact(za, mu_a, sd_a), exact(zb, mu_b, sd_b)
    ref = ((mu_a - mu_b) ** 2).sum() + ((sd_a - sd_b) ** 2).sum()
    d = frechet_distance(a, b)
    assert d == pytest.approx(ref, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(d, rel=1e-9)


def test_frechet_identical_symmetric_and_rank_deficient():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((300, 40)) @ rng.standard_normal((40, 40))
    b = rng.standard_normal((200, 40)) * 2 + 1
    scale = np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, a) <= 1e-6 * scale
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-8)
    assert frechet_distance(a, b) > 0
    # N < F (rank-deficient covariances) and float32 input: finite, symmetric, ~0 on itself
    small = rng.standard_normal((10, 64)).astype(np.float32)
    other = rng.standard_normal((12, 64)).astype(np.float32)
    assert frechet_distance(small, small) <= 1e-6 * np.trace(
        np.cov(small.astype(float), rowvar=False)
    )
    assert frechet_distance(small, other) == pytest.approx(frechet_distance(other, small), rel=1e-6)
    # shift by a constant: distance = squared shift
    assert frechet_distance(a, a + 0.5) == pytest.approx(0.25 * 40, rel=1e-6)
    with pytest.raises(ValueError):
        frechet_distance(a, b[:, :10])
    with pytest.raises(ValueError):
        frechet_distance(a[:1], b)
    with pytest.raises(ValueError):
        frechet_distance(np.full((5, 40), np.nan), b)


# ---------------------------------------------------------------------------------------------
# judge features


def test_judge_features_feed_the_heads():
    judge = AttributeJudge(width=8, size=64).eval()
    images = np.random.default_rng(4).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    f = judge_features(judge, images, batch=2)
    assert f.shape == (5, 192) and f.dtype == np.float32 and np.isfinite(f).all()
    with torch.no_grad():
        x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        ref = judge(x)
        again = judge.heads(torch.as_tensor(f))
    for lg, lg2 in zip(ref, again):
        torch.testing.assert_close(lg, lg2)
    assert judge_features(judge, images[:0]).shape == (0, 192)
