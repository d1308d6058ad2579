"""The UniF²aceD-1M reader (:mod:`unif2ace.data.unif2aced`): the mini dataset reads back; flat and
LLaVA-style VQA; field aliases (any case, Parquet structs, bare file names); splits by folder or
file name; every refusal names what was expected."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from unif2ace.data.readers import RecordError
from unif2ace.data.unif2aced import read_unif2aced, write_mini_unif2aced


def _img(path, colour=(200, 150, 120)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_mini_dataset_reads_back(tmp_path):
    root = write_mini_unif2aced(tmp_path / "d", n_images=4, size=32, seed=3)
    data = read_unif2aced(root)
    assert data.split == "train" and len(data) == 4
    assert data.images == [f"images/{i:05d}.png" for i in range(4)]
    assert all(data.path(i).is_file() for i in range(4))
    with Image.open(data.path(0)) as im:
        assert im.size == (32, 32)
    assert all(len(c) > 20 for c in data.captions)
    # one flat record (one turn) and one LLaVA record (two turns) per image
    assert len(data.vqa) == 8 and sorted(i for i, _ in data.vqa) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert sorted(len(t) for _, t in data.vqa) == [1] * 4 + [2] * 4
    for _, turns in data.vqa:
        for q, a in turns:
            assert q.endswith("?") and "<image>" not in q and q == q.strip() and a
    assert data.stats["vqa_turns"] == 12 and data.stats["caption_records"] == 4
    # deterministic in the seed
    again = read_unif2aced(write_mini_unif2aced(tmp_path / "e", n_images=4, size=32, seed=3))
    assert again.captions == data.captions and again.vqa == data.vqa


def test_llava_conversations(tmp_path):
    _img(tmp_path / "a.jpg")
    _jsonl(tmp_path / "captions.jsonl", [{"image": "a.jpg", "caption": "A face."}])
    conv = [
        {"from": "system", "value": "You describe faces."},
        {"from": "human", "value": "<image>\nWhat colour are the eyes?"},
        {"from": "gpt", "value": "Brown. "},
        {"from": "human", "value": "Is she smiling?\n<image>"},
        {"from": "gpt", "value": "yes"},
    ]
    roles = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hair?"}]},
        {"role": "assistant", "content": "short"},
    ]
    rows = [{"image": "a.jpg", "conversations": conv}, {"image": "a.jpg", "messages": roles}]
    (tmp_path / "face_vqa.json").write_text(json.dumps(rows))
    data = read_unif2aced(tmp_path)
    assert data.vqa == [
        (0, [("What colour are the eyes?", "Brown."), ("Is she smiling?", "yes")]),
        (0, [("Hair?", "short")]),
    ]


def test_field_aliases(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    for name in ("imgs/x/one.png", "imgs/two.webp", "imgs/three.jpeg", "four.jpg"):
        _img(tmp_path / name)
    # Parquet captions: file_name + text, one as a HF image struct
    table = pa.table(
        {
            "File_Name": ["imgs/x/one.png", "imgs/two.webp"],
            "TEXT": ["first", "second"],
        }
    )
    pq.write_table(table, tmp_path / "image_captions.parquet")
    struct = pa.table(
        {"image": [{"bytes": None, "path": "imgs/three.jpeg"}], "description": [["", "third"]]}
    )
    pq.write_table(struct, tmp_path / "more_captions.parquet")
    # JSON list: img + prompt; a bare file name found under the folder
    (tmp_path / "captions.json").write_text(json.dumps([{"img": "four.jpg", "prompt": "fourth"}]))
    _jsonl(
        tmp_path / "qa.jsonl",
        [
            {"path": "imgs/two.webp", "q": "Glasses?", "a": True},
            {"image_path": "one.png", "Question": "<image> Hat?", "Answer": "no"},
        ],
    )
    data = read_unif2aced(tmp_path)
    assert data.images == ["four.jpg", "imgs/three.jpeg", "imgs/two.webp", "imgs/x/one.png"]
    assert data.captions == ["fourth", "third", "second", "first"]
    assert data.vqa == [(2, [("Glasses?", "yes")]), (3, [("Hat?", "no")])]


def test_records_in_sub_folders_and_relative_paths(tmp_path):
    _img(tmp_path / "part0" / "img" / "a.png")
    _img(tmp_path / "part0" / "img" / "b.png")
    _jsonl(
        tmp_path / "part0" / "captions.jsonl",
        [{"image": "img/a.png", "caption": "a"}, {"image": "img/a.png", "caption": "again"}],
    )
    _jsonl(  # a folder names the kind: vqa/train-00000.jsonl
        tmp_path / "vqa" / "train-00000.jsonl",
        [{"image": "part0/img/b.png", "question": "q?", "answer": "ans"}],
    )
    data = read_unif2aced(tmp_path)
    assert data.images == ["part0/img/a.png", "part0/img/b.png"]
    assert data.captions == ["a", ""]  # b has no caption; a keeps its first
    assert data.stats["duplicate_captions"] == 1 and data.stats["images_without_caption"] == 1
    assert data.vqa == [(1, [("q?", "ans")])]


def test_splits_by_folder_and_by_name(tmp_path):
    for split in ("train", "test"):
        _img(tmp_path / split / "images" / f"{split}.png")
        _jsonl(
            tmp_path / split / "captions.jsonl",
            [{"image": f"images/{split}.png", "caption": split}],
        )
    _img(tmp_path / "extra.png")
    _jsonl(tmp_path / "vqa_test.jsonl", [{"image": "extra.png", "question": "q", "answer": "a"}])
    train, test = read_unif2aced(tmp_path), read_unif2aced(tmp_path, "test")
    assert train.images == ["train/images/train.png"] and train.captions == ["train"]
    assert train.vqa == [] and train.stats["splits"] == ["test", "train"]
    assert test.images == ["extra.png", "test/images/test.png"]
    assert test.captions == ["", "test"] and test.vqa == [(0, [("q", "a")])]
    with pytest.raises(FileNotFoundError, match="split 'val'.*the splits present are test, train"):
        read_unif2aced(tmp_path, "val")
    # no split word anywhere: everything is train
    root = write_mini_unif2aced(tmp_path / "mini", n_images=2, size=16)
    assert len(read_unif2aced(root, "train")) == 2
    with pytest.raises(FileNotFoundError, match="no captions file for split 'test'"):
        read_unif2aced(root, "test")


def test_no_captions_file(tmp_path):
    _img(tmp_path / "a.png")
    _jsonl(tmp_path / "vqa.jsonl", [{"image": "a.png", "question": "q", "answer": "a"}])
    with pytest.raises(FileNotFoundError) as e:
        read_unif2aced(tmp_path)
    msg = str(e.value)
    assert "no captions file" in msg and "captions.jsonl" in msg and "'caption'" in msg
    assert "vqa.jsonl" in msg  # what was found
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        read_unif2aced(tmp_path / "nope")


def test_record_without_a_known_field(tmp_path):
    _img(tmp_path / "a.png")
    _jsonl(tmp_path / "captions.jsonl", [{"picture": "a.png", "caption": "x"}])
    with pytest.raises(RecordError) as e:
        read_unif2aced(tmp_path)
    msg = str(e.value)
    assert "captions.jsonl:1" in msg
    assert "expected one of image/image_path/file_name/path/img" in msg
    assert "the record has keys ['caption', 'picture']" in msg
    _jsonl(tmp_path / "captions.jsonl", [{"image": "a.png", "words": "x"}])
    with pytest.raises(RecordError, match="no caption field: expected one of caption/text/desc"):
        read_unif2aced(tmp_path)
    _jsonl(tmp_path / "captions.jsonl", [{"image": "a.png", "caption": "x"}])
    _jsonl(tmp_path / "vqa.jsonl", [{"image": "a.png", "question": "q"}])
    with pytest.raises(RecordError, match=r"vqa.jsonl:1: expected a question .* and an answer"):
        read_unif2aced(tmp_path)


@pytest.mark.parametrize(
    "conv, message",
    [
        ([{"from": "gpt", "value": "a"}], "an answer without a question"),
        ([{"from": "human", "value": "q"}], "the last question has no answer"),
        ([{"from": "robot", "value": "q"}], "expected from/role in human/user/gpt"),
        ([], "non-empty list of messages"),
    ],
)
def test_bad_conversations(tmp_path, conv, message):
    _img(tmp_path / "a.png")
    _jsonl(tmp_path / "captions.jsonl", [{"image": "a.png", "caption": "x"}])
    _jsonl(tmp_path / "vqa.jsonl", [{"image": "a.png", "conversations": conv}])
    with pytest.raises(RecordError, match=message):
        read_unif2aced(tmp_path)


def test_missing_images_are_named_and_counted(tmp_path):
    _img(tmp_path / "a.png")
    rows = [{"image": "a.png", "caption": "x"}]
    rows += [{"image": f"gone/{i}.png", "caption": "y"} for i in range(7)]
    _jsonl(tmp_path / "captions.jsonl", rows)
    with pytest.raises(ValueError) as e:
        read_unif2aced(tmp_path)
    msg = str(e.value)
    assert "7 referenced image(s) do not exist" in msg
    assert "gone/0.png (" in msg and "captions.jsonl:2" in msg and "and 2 more" in msg
    # skipped instead, and counted
    data = read_unif2aced(tmp_path, on_error="skip")
    assert data.images == ["a.png"] and data.stats["missing_images"] == 7
    assert data.stats["skipped"] == 7 and "image not found: gone/0.png" in data.stats["messages"][0]


def test_empty_dataset(tmp_path):
    (tmp_path / "captions.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="split 'train' is empty.*captions.jsonl"):
        read_unif2aced(tmp_path)
    with pytest.raises(ValueError, match="on_error"):
        read_unif2aced(tmp_path, on_error="ignore")
