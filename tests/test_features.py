"""The feature cache (:mod:`unif2ace.pipeline.features`, ``unif2ace tokenize-images``) on the mini
UniF²aceD-1M dataset with a miniature random MAGVIT-v2 and small stand-in encoders: codes equal a
direct MAGVIT encode; a killed run resumes to the same shards; a cache of other encoders or
another image list is refused; a face ONNX of another input size is refused; the command runs
end to end."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from onnx_mini import tiny_face_onnx
from PIL import Image
from safetensors import safe_open
from test_magvitv2 import MINI, random_state, write_checkpoint

from unif2ace import cli
from unif2ace.cli import features as features_cli
from unif2ace.data.readers import load_image
from unif2ace.data.unif2aced import read_unif2aced, write_mini_unif2aced
from unif2ace.io import FolderLocked
from unif2ace.pipeline.features import FeatureCache, build_features, shard_name
from unif2ace.vq.magvitv2 import MagvitV2, MagvitV2Config, preprocess_image

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32  # pixels: 2 × 2 codes


class FakeEmbed:
    """A stand-in encoder: per-channel means of the [-1, 1] image times a fixed matrix."""

    def __init__(self, dim: int, seed: int = 0, size=None):
        self.w = torch.randn(3, dim, generator=torch.Generator().manual_seed(seed))
        self.dim, self.fingerprint = dim, f"fake-{dim}-{seed}"
        if size is not None:
            self.size = size

    def embed(self, images):
        return torch.nn.functional.normalize(images.float().mean((2, 3)) @ self.w, dim=-1)


def mini_magvit(seed: int = 1) -> MagvitV2:
    model = MagvitV2(MINI)
    model.load_state_dict(random_state(MINI, seed=seed))
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def magvit():
    return mini_magvit()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_mini_unif2aced(tmp_path_factory.mktemp("data"), n_images=5, size=48)


def _build(dataset, out, default_magvit, **kw):
    """build_features with the test defaults (``kw`` overrides them, ``magvit=`` included)."""
    args = dict(
        magvit=default_magvit, clip=FakeEmbed(6), face=FakeEmbed(4, 1), image_size=SIZE,
        shard_size=2, batch_size=3, progress=False,
    )  # fmt: skip
    return build_features(dataset, out, **{**args, **kw})


def _shards(out):
    """name -> (metadata, {tensor name: tensor as a numpy array (for ==)}) of every shard."""
    shards = {}
    for p in sorted(out.glob("shard_*.safetensors")):
        with safe_open(str(p), "pt") as f:
            shards[p.name] = (
                f.metadata(),
                {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()},
            )
    return shards


def test_codes_and_embeddings_equal_a_direct_encode(tmp_path, dataset, magvit):
    res = _build(dataset, tmp_path / "f", magvit, workers=2)
    assert res["images"] == 5 and res["shards"] == 3 and res["written"] == 3
    assert res["skipped"] == 0 and res["complete"] and res["tokens_per_image"] == 4
    assert (res["clip_dim"], res["face_dim"]) == (6, 4)
    cache = FeatureCache(tmp_path / "f")
    data = read_unif2aced(dataset)
    x = torch.cat([preprocess_image(load_image(str(data.path(i))), SIZE) for i in range(5)])
    assert len(cache) == 5 and cache.codes.dtype == torch.int16 and cache.codes.shape == (5, 4)
    assert torch.equal(cache.codes.long(), magvit.get_code(x))
    torch.testing.assert_close(cache.clip, FakeEmbed(6).embed(x))
    torch.testing.assert_close(cache.face, FakeEmbed(4, 1).embed(x))
    assert torch.equal(cache.index, torch.arange(5))
    m = cache.manifest
    assert m["complete"] and m["images"] == 5 and m["split"] == "train" and m["shard_size"] == 2
    assert m["encoders"]["magvit"]["codebook_size"] == 8192 and m["encoders"]["face"]["dim"] == 4
    assert m["dataset_root"] == str(dataset.resolve())
    assert cache.check(dataset).images == data.images
    # without clip / face: only codes
    build_features(dataset, tmp_path / "g", magvit=magvit, image_size=SIZE, progress=False)
    only = FeatureCache(tmp_path / "g")
    assert only.clip is None and only.face is None and torch.equal(only.codes, cache.codes)
    assert only.manifest["shards"] == 1


def test_resume_after_a_kill(tmp_path, dataset, magvit):
    _build(dataset, tmp_path / "clean", magvit)

    def kill_after_second(i):
        if i == 1:
            raise KeyboardInterrupt

    out = tmp_path / "f"
    (out).mkdir()
    (out / "shard_00002.safetensors.tmp.99999").write_bytes(b"half")  # an earlier kill's
    with pytest.raises(KeyboardInterrupt):
        _build(dataset, out, magvit, on_shard=kill_after_second)
    assert not list(out.glob("*.tmp.*"))
    assert sorted(_shards(out)) == [shard_name(0), shard_name(1)]
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    with pytest.raises(ValueError, match=r"incomplete \(2 of 3 shards.*run tokenize-images again"):
        FeatureCache(out)
    seen = []
    res = _build(dataset, out, magvit, on_shard=seen.append)
    assert (res["written"], res["skipped"], seen) == (1, 2, [2])
    assert _shards(out) == _shards(tmp_path / "clean")  # same tensors, same metadata
    # a complete cache: nothing to do
    assert _build(dataset, out, magvit)["skipped"] == 3
    # a damaged shard is refused when read, and written again on the next run
    path = out / shard_name(1)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="shard_00001.safetensors is missing or does not match"):
        FeatureCache(out)
    res = _build(dataset, out, magvit)
    assert (res["written"], res["skipped"]) == (1, 2)
    assert _shards(out) == _shards(tmp_path / "clean")


def test_other_setup_is_refused_unless_forced(tmp_path, dataset, magvit):
    out = tmp_path / "f"
    _build(dataset, out, magvit)
    before = _shards(out)
    cases = [
        (dict(magvit=mini_magvit(seed=2)), "magvit encoder .* differs from the one given"),
        (dict(face=FakeEmbed(4, seed=5)), "face encoder FakeEmbed .* differs"),
        (dict(clip=None), r"clip cached \(now not given\)"),
        (dict(shard_size=3), r"shard size 2 \(now 3\)"),
        (dict(image_size=16), r"image size 32 \(now 16\)"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            _build(dataset, out, magvit, **kw)
        assert "force=True (--force)" in str(e.value)
    assert _shards(out) == before
    res = _build(dataset, out, magvit, shard_size=3, force=True)
    assert res["written"] == 2 and sorted(_shards(out)) == [shard_name(0), shard_name(1)]
    assert FeatureCache(out).manifest["shard_size"] == 3
    # the same weights loaded separately are the same encoder (the state dict is hashed)
    assert _build(dataset, out, mini_magvit(), shard_size=3)["skipped"] == 2


def test_another_image_list(tmp_path, dataset, magvit):
    out = tmp_path / "f"
    _build(dataset, out, magvit)
    other = shutil.copytree(dataset, tmp_path / "copy")
    assert FeatureCache(out).check(other).images == read_unif2aced(dataset).images  # moved: same
    Image.new("RGB", (48, 48)).save(other / "images" / "00004.png")  # another file, same name
    with pytest.raises(ValueError, match="made from another image list .5 images.*5 images"):
        FeatureCache(out).check(other)
    with pytest.raises(ValueError, match=r"image list [0-9a-f]{64} \(now [0-9a-f]{64}\)"):
        _build(other, out, magvit)
    for name in ("captions.jsonl", "vqa.jsonl"):  # one image fewer
        rows = (other / name).read_text().splitlines()
        (other / name).write_text("".join(r + "\n" for r in rows if "00004" not in r))
    llava = json.loads((other / "vqa_llava.json").read_text())
    (other / "vqa_llava.json").write_text(
        json.dumps([r for r in llava if "00004" not in r["image"]])
    )
    with pytest.raises(ValueError, match="made from another image list .5 images.*4 images"):
        FeatureCache(out).check(other)
    with pytest.raises(ValueError, match=r"images 5 \(now 4\); image list"):
        _build(other, out, magvit)


def test_the_folder_has_one_writer(tmp_path, dataset, magvit):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "f"
    _build(dataset, out, magvit)
    fd = os.open(out / ".lock", os.O_RDWR)  # another open file: as another process's lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FolderLocked, match="is in use"):
            _build(dataset, out, magvit)
        with pytest.raises(FolderLocked, match="is in use"):  # not read while being written
            FeatureCache(out)
    finally:
        os.close(fd)
    assert len(FeatureCache(out)) == 5


def test_encoder_checks(tmp_path, dataset, magvit):
    with pytest.raises(ValueError, match="face .*takes 96×96 images; expected a 112×112"):
        _build(dataset, tmp_path / "a", magvit, face=FakeEmbed(4, size=(96, 96)))
    with pytest.raises(ValueError, match="its embeddings have 4 dims .*; expected 512"):
        _build(dataset, tmp_path / "a", magvit, expect_face_dim=512)
    with pytest.raises(ValueError, match="clip encoder FakeEmbed: its embeddings have 6 dims"):
        _build(dataset, tmp_path / "a", magvit, expect_clip_dim=768)
    with pytest.raises(ValueError, match="image_size must be a multiple of 16"):
        _build(dataset, tmp_path / "a", magvit, image_size=40)
    with pytest.raises(TypeError, match="magvit must be a MAGVIT-v2 folder or a loaded"):
        _build(dataset, tmp_path / "a", magvit, magvit=object())
    with pytest.raises(ValueError, match="is not a MAGVIT-v2 checkpoint folder"):
        _build(dataset, tmp_path / "a", magvit, magvit=tmp_path)
    with pytest.raises(FileNotFoundError, match="not a feature cache"):
        FeatureCache(tmp_path / "a")


def test_undecodable_image_is_named(tmp_path, dataset, magvit):
    bad = shutil.copytree(dataset, tmp_path / "bad")
    (bad / "images" / "00003.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="image 3 of .*cannot decode image .*00003.png"):
        _build(bad, tmp_path / "f", magvit)


def test_clip_folder(tmp_path, dataset, magvit):
    transformers = pytest.importorskip("transformers")
    from unif2ace.encoders.adapters import ClipVisionAdapter

    cfg = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
        image_size=32, patch_size=16, projection_dim=16,
    )  # fmt: skip
    transformers.CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path / "clip")
    res = _build(dataset, tmp_path / "f", magvit, clip=tmp_path / "clip", face=None)
    assert res["clip_dim"] == 16
    cache = FeatureCache(tmp_path / "f")
    ident = cache.manifest["encoders"]["clip"]
    assert ident["source"] == str((tmp_path / "clip").resolve()) and ident["input_size"] == 32
    assert ident["class"] == "ClipVisionAdapter" and len(ident["weights_sha256"]) == 64
    data = read_unif2aced(dataset)
    x = torch.cat([preprocess_image(load_image(str(data.path(i))), SIZE) for i in range(5)])
    ref = ClipVisionAdapter(tmp_path / "clip").embed(x)
    torch.testing.assert_close(cache.clip, ref, atol=1e-5, rtol=1e-4)
    # the same folder again resumes (the loaded weights hash the same)
    assert _build(dataset, tmp_path / "f", magvit, clip=tmp_path / "clip", face=None)["skipped"]


def test_face_onnx_input_size(tmp_path, dataset, magvit):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    ok = tmp_path / "face112.onnx"
    tiny_face_onnx(ok, 112)
    res = _build(dataset, tmp_path / "f", magvit, face=ok, clip=None)
    assert res["face_dim"] == 8
    m = FeatureCache(tmp_path / "f").manifest["encoders"]["face"]
    assert m["source"] == str(ok.resolve()) and m["input_size"] == [112, 112]
    assert len(m["weights_sha256"]) == 64 and m["class"] == "OnnxFaceAdapter"
    small = tmp_path / "face96.onnx"
    tiny_face_onnx(small, 96)
    with pytest.raises(ValueError) as e:
        _build(dataset, tmp_path / "g", magvit, face=small)
    msg = str(e.value)
    assert "face96.onnx" in msg and "takes 96×96 images" in msg and "expected a 112×112" in msg
    assert "declares shape ['N', 3, 96, 96]" in msg
    with pytest.raises(
        ValueError, match="face encoder .*face112.onnx: its embeddings have 8 dims.*expected 512"
    ):
        _build(dataset, tmp_path / "g", magvit, face=ok, expect_face_dim=512)


@pytest.fixture(scope="module")
def release_magvit(tmp_path_factory):
    """The released-size MAGVIT-v2 with random weights (the command loads only that size)."""
    return write_checkpoint(
        tmp_path_factory.mktemp("magvit"), random_state(MagvitV2Config()), "model.safetensors"
    )


def test_tokenize_images_command(tmp_path, dataset, release_magvit, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    monkeypatch.setitem(cli.COMMANDS, "tokenize-images", features_cli.COMMANDS["tokenize-images"])
    face = tmp_path / "face.onnx"
    tiny_face_onnx(face, 112)
    run = tmp_path / "run"
    argv = ["tokenize-images", "--data", str(dataset), "--magvit", str(release_magvit)]
    argv += ["--face-onnx", str(face), "--out", str(run), "--image-size", str(SIZE)]
    argv += ["--shard-size", "3", "--batch-size", "2", "--quiet", "--device", "cpu"]
    assert cli.main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["images"], res["written"], res["skipped"], res["shards"]) == (5, 2, 0, 2)
    assert res["face_dim"] == 8 and res["clip_dim"] is None and res["seconds"] >= 0
    cache = FeatureCache(run / "features" / "train")
    assert cache.codes.shape == (5, 4) and cache.face.shape == (5, 8) and cache.clip is None
    assert 0 <= cache.codes.min() and cache.codes.max() < 8192
    assert cli.main(argv) == 0  # resumes: nothing left to do
    assert json.loads(capsys.readouterr().out)["skipped"] == 2
    # errors: one line, exit status 2
    assert cli.main([*argv, "--shard-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "tokenize-images: error:" in err and "shard size 3 (now 4)" in err
    assert cli.main([*argv, "--split", "test"]) == 2
    assert "no captions file for split 'test'" in capsys.readouterr().err
