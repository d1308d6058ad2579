"""Readers: every field-mapping option, every file format, corrupt and missing records (raise with
file:line, or skip and count)."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unif2ace.data.readers import (
    FieldMap,
    RecordError,
    iter_rows,
    load_image,
    load_images_from_records,
    read_records,
)


def _png(color=(10, 20, 30), size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.png").write_bytes(_png((i * 40, 0, 0)))
    return d


def _jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def _parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_default_fields_jsonl(tmp_path, images):
    f = _jsonl(
        tmp_path / "c.jsonl",
        [{"id": f"a{i}", "image": f"imgs/{i}.png", "caption": f"face {i}"} for i in range(3)],
    )
    recs, st = read_records(f)
    assert st.read == 3 and st.skipped == 0
    assert [r.texts for r in recs] == [["face 0"], ["face 1"], ["face 2"]]
    assert recs[1].id == "a1" and recs[1].line == 2 and recs[1].image.endswith("imgs/1.png")


def test_custom_fields_ffhq_text_style(tmp_path, images):
    f = _jsonl(
        tmp_path / "ffhq.jsonl", [{"file_name": f"{i}.png", "text": f"t{i}"} for i in range(3)]
    )
    recs, _ = read_records(
        f, fields=FieldMap(image="file_name", text="text", id=None), image_root=images
    )
    assert [r.id for r in recs] == ["1", "2", "3"]  # line numbers without an id field
    assert recs[2].texts == ["t2"]


def test_list_of_captions_celeba_style(tmp_path, images):
    f = _jsonl(tmp_path / "celeba.jsonl", [{"img": "imgs/0.png", "captions": ["a", "b", "c"]}])
    recs, _ = read_records(f, fields=FieldMap(image="img", text="captions"))
    assert recs[0].texts == ["a", "b", "c"]


def test_vqa_custom_fields(tmp_path, images):
    f = _jsonl(
        tmp_path / "v.jsonl",
        [
            {"image": "imgs/0.png", "q": "Is it red?", "a": "yes"},
            {"image": "imgs/1.png", "q": "How many?", "a": 3},
        ],
    )
    recs, _ = read_records(f, "vqa", FieldMap(question="q", answer="a"))
    assert [(r.question, r.answer) for r in recs] == [("Is it red?", "yes"), ("How many?", "3")]


def test_attributes_and_identity_fields(tmp_path, images):
    f = _jsonl(
        tmp_path / "a.jsonl", [{"image": "imgs/0.png", "attrs": {"hat": "cap"}, "person": 7}]
    )
    recs, _ = read_records(f, "attributes", FieldMap(attributes="attrs", identity="person"))
    assert recs[0].attributes == {"hat": "cap"} and recs[0].identity == 7


def test_json_array_format(tmp_path, images):
    f = tmp_path / "c.json"
    f.write_text(
        json.dumps(
            [{"image": "imgs/0.png", "caption": "x"}, {"image": "imgs/2.png", "caption": "y"}]
        )
    )
    recs, _ = read_records(f)
    assert [r.texts[0] for r in recs] == ["x", "y"]


def test_explicit_format_overrides_extension(tmp_path, images):
    f = _jsonl(tmp_path / "c.txt", [{"image": "imgs/0.png", "caption": "x"}])
    with pytest.raises(ValueError, match="format"):
        read_records(f)
    recs, _ = read_records(f, format="jsonl")
    assert recs[0].texts == ["x"]


def test_parquet_paths_and_embedded_bytes(tmp_path, images):
    f = _parquet(
        tmp_path / "c.parquet",
        [
            {"image": {"bytes": _png((200, 0, 0)), "path": "x.png"}, "caption": "red"},
            {"image": {"bytes": None, "path": "imgs/1.png"}, "caption": "path only"},
        ],
    )
    recs, st = read_records(f)
    assert st.read == 2
    assert isinstance(recs[0].image, bytes) and recs[1].image.endswith("imgs/1.png")
    arr = load_images_from_records(f, size=8)
    assert arr.shape == (2, 8, 8, 3) and tuple(arr[0, 0, 0]) == (200, 0, 0)


def test_parquet_custom_fields(tmp_path, images):
    f = _parquet(
        tmp_path / "v.parquet", [{"path": "imgs/0.png", "question": "q?", "response": "no"}]
    )
    recs, _ = read_records(f, "vqa", FieldMap(image="path", answer="response"))
    assert recs[0].answer == "no" and recs[0].line == 1


def test_corrupt_json_line_names_file_and_line(tmp_path, images):
    f = _jsonl(
        tmp_path / "c.jsonl",
        [{"image": "imgs/0.png", "caption": "ok"}],
        raw_lines=[
            '{"image": "imgs/1.png", "caption": ',
            '{"image": "imgs/2.png", "caption": "fine"}',
        ],
    )
    with pytest.raises(RecordError, match=r"c\.jsonl:2: invalid JSON") as e:
        read_records(f)
    assert e.value.line == 2 and e.value.path.endswith("c.jsonl")
    recs, st = read_records(f, on_error="skip")
    assert [r.texts[0] for r in recs] == ["ok", "fine"]
    assert st.read == 2 and st.skipped == 1 and ":2:" in st.messages[0]


def test_non_object_line(tmp_path, images):
    f = _jsonl(
        tmp_path / "c.jsonl", [{"image": "imgs/0.png", "caption": "ok"}], raw_lines=["[1, 2]"]
    )
    with pytest.raises(RecordError, match=":2: a record must be a JSON object"):
        read_records(f)


def test_missing_field(tmp_path, images):
    f = _jsonl(
        tmp_path / "c.jsonl",
        [
            {"image": "imgs/0.png", "caption": "ok"},
            {"image": "imgs/1.png", "text": "wrong name"},
            {"caption": "no image"},
        ],
    )
    with pytest.raises(RecordError, match=r":2: missing field 'caption'"):
        read_records(f)
    recs, st = read_records(f, on_error="skip")
    assert len(recs) == 1 and st.skipped == 2
    assert "missing field 'image'" in st.messages[1] and ":3:" in st.messages[1]


def test_wrong_type_and_empty_caption(tmp_path, images):
    f = _jsonl(
        tmp_path / "c.jsonl",
        [{"image": "imgs/0.png", "caption": 5}, {"image": "imgs/0.png", "caption": "  "}],
    )
    with pytest.raises(RecordError, match=":1: field 'caption' has type int"):
        read_records(f)
    _, st = read_records(f, on_error="skip")
    assert st.skipped == 2 and "non-empty" in st.messages[1]


def test_missing_image_file(tmp_path, images):
    f = _jsonl(
        tmp_path / "c.jsonl",
        [{"image": "imgs/0.png", "caption": "a"}, {"image": "imgs/404.png", "caption": "b"}],
    )
    with pytest.raises(RecordError, match=r":2: image file not found: .*404\.png"):
        read_records(f)
    recs, st = read_records(f, on_error="skip")
    assert len(recs) == 1 and st.skipped == 1
    recs, _ = read_records(f, check_images=False)  # e.g. for the text tokenizer
    assert len(recs) == 2


def test_undecodable_image(tmp_path, images):
    (images / "bad.png").write_bytes(b"not a png")
    f = _jsonl(
        tmp_path / "c.jsonl",
        [{"image": "imgs/0.png", "caption": "a"}, {"image": "imgs/bad.png", "caption": "b"}],
    )
    with pytest.raises(ValueError, match=r"c\.jsonl:2: cannot decode image .*bad\.png"):
        load_images_from_records(f, size=16)
    arr = load_images_from_records(f, size=16, on_error="skip")
    assert arr.shape == (1, 16, 16, 3)


def test_blank_lines_are_not_records(tmp_path, images):
    f = tmp_path / "c.jsonl"
    f.write_text(
        '{"image": "imgs/0.png", "caption": "a"}\n\n  \n{"image": "imgs/1.png", "caption": "b"}\n'
    )
    recs, st = read_records(f)
    assert [r.line for r in recs] == [1, 4] and st.skipped == 0


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="record file not found"):
        read_records(tmp_path / "none.jsonl")
    f = _jsonl(tmp_path / "c.jsonl", [])
    with pytest.raises(ValueError, match="on_error"):
        list(iter_rows(f, on_error="ignore"))
    with pytest.raises(ValueError, match="kind"):
        read_records(f, kind="pairs")


def test_corrupt_parquet_file(tmp_path):
    f = tmp_path / "c.parquet"
    f.write_bytes(b"PAR1 garbage")
    with pytest.raises(RecordError, match="not a readable Parquet file"):
        read_records(f)


def test_load_image_resizes():
    a = load_image(_png((1, 2, 3), 20), size=8)
    assert a.shape == (8, 8, 3) and a.dtype == np.uint8
