"""SynthFace: taxonomy size, determinism (byte-identical files), splits by identity, coverage,
captions, VQA answers checked against the attribute file, sizes, Parquet output, CLI."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from unif2ace.cli import main
from unif2ace.data.readers import dataset_stats, iter_rows, load_split
from unif2ace.data.synthface import (
    _WEARABLES,
    _YES_NO_OPEN,
    SynthFaceConfig,
    draw_image,
    expected_answer,
    generate,
    make_caption,
    make_vqa,
    open_answer,
    sample_image,
    split_of_identity,
)
from unif2ace.data.taxonomy import BY_NAME, CATEGORIES, encode_attributes
from unif2ace.eval.metrics import parse_caption


def _digest(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("sf") / "a"
    generate(
        root,
        SynthFaceConfig(num_images=120, seed=3, images_per_identity=4),
        workers=2,
        progress=False,
        chunk=25,
    )
    return root


def test_taxonomy_size():
    assert len(CATEGORIES) >= 15
    assert sum(len(c.values) for c in CATEGORIES) >= 45
    for c in CATEGORIES:
        assert len(set(c.values)) == len(c.values) >= 2
        assert set(c.words) == set(c.values)


def test_same_seed_gives_byte_identical_files(small_set, tmp_path):
    # a second run with another worker count and chunking: same bytes in every file
    generate(
        tmp_path / "b",
        SynthFaceConfig(num_images=120, seed=3, images_per_identity=4),
        workers=1,
        progress=False,
        chunk=7,
    )
    a, b = _digest(small_set), _digest(tmp_path / "b")
    assert len(a) == 120 + 9 + 1
    assert a == b


def test_other_seed_differs(tmp_path):
    generate(tmp_path / "s1", SynthFaceConfig(num_images=10, seed=1), workers=1, progress=False)
    generate(tmp_path / "s2", SynthFaceConfig(num_images=10, seed=2), workers=1, progress=False)
    assert _digest(tmp_path / "s1") != _digest(tmp_path / "s2")


def test_splits_are_by_identity(small_set):
    owner = {}
    for split in ("train", "val", "test"):
        for _, row in iter_rows(small_set / f"attributes_{split}.jsonl"):
            assert owner.setdefault(row["identity"], split) == split
            assert row["image"].startswith(f"images/{split}/")
            assert (small_set / row["image"]).is_file()
    assert set(owner.values()) == {"train", "val", "test"}
    meta = json.loads((small_set / "meta.json").read_text())
    assert sum(s["images"] for s in meta["splits"].values()) == 120


def test_identity_geometry_is_fixed():
    # same identity: same identity-level attributes in every image; images differ
    attrs = [sample_image(0, i, 8)[1]["attrs"] for i in range(16, 24)]
    for c in CATEGORIES:
        if c.identity:
            vals = {a[c.name] for a in attrs if a[c.name] is not None}
            assert len(vals) == 1, c.name
    idents = [sample_image(0, i, 8)[0] for i in range(16, 24)]
    assert all(d["fa"] == idents[0]["fa"] and d["eye_dx"] == idents[0]["eye_dx"] for d in idents)
    imgs = [np.asarray(draw_image(i)[0]) for i in range(16, 20)]
    assert not np.array_equal(imgs[0], imgs[1])


def test_every_value_covered_in_train():
    seen = {c.name: set() for c in CATEGORIES}
    for i in range(800):
        _, img = sample_image(0, i, 8)
        if split_of_identity(img["identity"]) != "train":
            continue
        for k, v in img["attrs"].items():
            if v is not None:
                seen[k].add(v)
    for c in CATEGORIES:
        assert seen[c.name] == set(c.values), c.name


def test_hidden_attributes_are_none():
    n = Counter()
    for i in range(400):
        _, img = sample_image(0, i, 8)
        a = img["attrs"]
        if a["glasses"] == "sunglasses":
            assert a["eye_colour"] is None
            n["sun"] += 1
        if a["mask"] != "none":
            assert a["expression"] is None and a["beard"] is None and a["lipstick"] is None
            n["mask"] += 1
        if a["hair_length"] == "bald":
            assert a["hair_colour"] is None and a["hair_style"] is None and a["bangs"] == "no"
            n["bald"] += 1
    assert min(n.values()) > 10


def test_captions_mention_at_least_ten_attributes_and_say_them():
    counts, captions = [], set()
    for i in range(300):
        _, img = sample_image(0, i, 8)
        text, mentioned = make_caption(img["attrs"], img["text_seed"])
        counts.append(len(mentioned))
        captions.add(text)
        low = text.lower()
        for cat in mentioned:
            v = img["attrs"][cat]
            assert v is not None
            words = {
                "medium": ["shoulder-length"],
                "bald": ["bald", "no hair"],
                "none": ["no"],
                "no": ["no"],
                "hoops": ["hoop"],
                "surprised": ["surprise"],
                "yes": [BY_NAME[cat].words.get("yes", "")],
            }.get(v, [v])
            assert any(w in low for w in words), (cat, v, text)
    assert np.mean(counts) >= 10
    assert len(captions) == 300
    openings = Counter(c.split(" with ")[0] for c in captions)
    assert len(openings) >= 5  # varied phrasing


def test_captions_say_categories_in_a_fixed_order():
    """Wording varies, the order does not: the hair, the rest of the face in taxonomy order
    (absent accessories among them), what is worn, then the background."""
    index = {c.name: i for i, c in enumerate(CATEGORIES)}
    hair = ("hair_length", "hair_style", "hair_colour")

    def rank(cat, attrs):
        if cat in hair:
            return -1
        if cat == "background":
            return 200
        worn = cat in _WEARABLES and attrs[cat] != BY_NAME[cat].none_value
        return index[cat] + (100 if worn else 0)

    sentence_orders = set()
    for i in range(200):
        _, img = sample_image(0, i, 8)
        text, mentioned = make_caption(img["attrs"], img["text_seed"])
        sentences = [s for s in text.split(". ") if s]
        ranks = [sorted(rank(c, img["attrs"]) for c in parse_caption(s)) for s in sentences]
        assert sum(len(r) for r in ranks) == len(mentioned), text
        for a, b in zip(ranks, ranks[1:]):
            assert max(a) < min(b), text
        sentence_orders.add(tuple(len(r) for r in ranks))
    assert len(sentence_orders) > 20  # the grouping into sentences still varies


def test_yes_no_value_questions_are_balanced():
    """A question's wording must not give its answer: on categories with no "absent" value
    ("Does the person have blue eyes?") yes and no are equally likely."""
    n = Counter()
    for i in range(2000):
        _, img = sample_image(0, i, 8)
        for q in make_vqa(img["attrs"], img["text_seed"], 4):
            if "asked" in q and BY_NAME[q["attribute"]].none_value is None:
                n[q["answer"].split()[-1]] += 1  # "brown, so no": the decision comes last
    assert sum(n.values()) > 1000
    assert 0.45 < n["yes"] / sum(n.values()) < 0.55, n


def test_vqa_answers_agree_with_attribute_file(small_set):
    n = Counter()
    for split in ("train", "val", "test"):
        attrs = {
            row["image"]: row["attributes"]
            for _, row in iter_rows(small_set / f"attributes_{split}.jsonl")
        }
        for line, rec in iter_rows(small_set / f"vqa_{split}.jsonl"):
            a = attrs[rec["image"]]
            assert a[rec["attribute"]] is not None, "asked about a hidden attribute"
            assert rec["answer"] == expected_answer(rec, a), (line, rec)
            if rec["type"] == "yes_no":
                decision = rec["answer"].split()[-1]
                assert decision in ("yes", "no")
                if "asked" in rec and rec["attribute"] not in _YES_NO_OPEN:
                    # what the face has, then the decision
                    value = open_answer(rec["attribute"], a[rec["attribute"]])
                    assert rec["answer"] == f"{value}, so {decision}", rec
                    assert (decision == "yes") == (rec["asked"] == a[rec["attribute"]])
                else:
                    assert rec["answer"] == decision
                if "asked" in rec:
                    assert (
                        BY_NAME[rec["attribute"]].words[rec["asked"]] in rec["question"]
                        or rec["asked"] in rec["question"]
                    )
            n[rec["type"], rec["answer"].split()[-1] if rec["type"] == "yes_no" else "open"] += 1
    assert n["open", "open"] > 0 and n["yes_no", "yes"] > 0 and n["yes_no", "no"] > 0


def test_vqa_open_answers_name_the_value():
    for i in range(200):
        _, img = sample_image(0, i, 8)
        for rec in make_vqa(img["attrs"], img["text_seed"], 6):
            v = img["attrs"][rec["attribute"]]
            if rec["type"] == "open" and rec["attribute"] in (
                "skin_tone",
                "eye_colour",
                "hair_colour",
                "background",
            ):
                assert rec["answer"] == v


@pytest.mark.parametrize("size", [32, 64, 100, 256])
def test_sizes(size):
    im, _ = draw_image(5, size=size)
    assert im.size == (size, size) and im.mode == "RGB"


def test_bad_size_rejected(tmp_path):
    with pytest.raises(ValueError, match="size"):
        generate(tmp_path, SynthFaceConfig(num_images=2, size=16), progress=False)


def test_parquet_output_matches_jsonl(small_set, tmp_path):
    generate(
        tmp_path / "pq",
        SynthFaceConfig(num_images=120, seed=3, images_per_identity=4),
        workers=1,
        fmt="parquet",
        progress=False,
    )
    a = list(iter_rows(small_set / "vqa_test.jsonl"))
    b = list(iter_rows(tmp_path / "pq" / "vqa_test.parquet"))
    strip = lambda r: {k: v for k, v in r.items() if v is not None}  # noqa: E731
    assert [strip(r) for _, r in a] == [strip(r) for _, r in b]
    arr = load_split(tmp_path / "pq", "test")
    per_image = SynthFaceConfig.vqa_per_image
    assert arr.images.shape[1:] == (64, 64, 3) and len(arr.ids) == len(a) // per_image


def test_load_split_and_stats(small_set):
    arr = load_split(small_set, "train")
    assert arr.images.dtype == np.uint8 and arr.labels.shape == (len(arr.images), len(CATEGORIES))
    _, img = sample_image(3, int(arr.ids[0]), 4)
    assert list(arr.labels[0]) == encode_attributes(img["attrs"])
    st = dataset_stats(small_set)
    assert st["categories"] == len(CATEGORIES)
    assert st["train"]["caption_attributes_mean"] >= 10


def test_cli_make_data_and_text_tokenizer(tmp_path, capsys):
    assert (
        main(
            ["make-data", "--out", str(tmp_path), "--num-images", "40", "--workers", "1", "--quiet"]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["num_images"] == 40 and res["categories"] >= 15
    assert (
        main(["train-text-tokenizer", "--out", str(tmp_path), "--vocab-size", "600", "--quiet"])
        == 0
    )
    assert (tmp_path / "text_tokenizer" / "tokenizer.json").is_file()
    assert (
        main(["train-vq", "--out", str(tmp_path), "--data", str(tmp_path / "nowhere"), "--quiet"])
        == 2
    )


@pytest.mark.slow
def test_cli_data_all_fast(tmp_path):
    assert (
        main(["data-all", "--out", str(tmp_path), "--num-images", "200", "--fast", "--quiet"]) == 0
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) == {
        "make-data",
        "train-text-tokenizer",
        "train-judge",
        "train-vq",
        "train-encoders",
    }
    for sub in (
        "synthface/meta.json",
        "text_tokenizer/tokenizer.json",
        "judge/model.safetensors",
        "vq/model.safetensors",
        "vq/config.json",
        "encoders/identity/model.safetensors",
        "encoders/embeddings/semantic_test.safetensors",
    ):
        assert (tmp_path / sub).is_file(), sub
    assert (
        "judge" in report["train-vq"]
        and "roc_auc" in report["train-encoders"]["identity_test_verification"]
    )
    assert main(["eval-vq", "--out", str(tmp_path), "--quiet"]) == 0
