"""Semantic / identity encoders, ArcFace margin, ROC-AUC, embedding cache, the attribute judge, and
the adapters for real encoders (a tiny CLIP vision model and a tiny ONNX face model created here)."""

import json

import numpy as np
import pytest
import torch
from onnx_mini import tiny_face_onnx

from unif2ace.data.synthface import draw_arrays
from unif2ace.data.taxonomy import CATEGORIES, NUM_VALUES
from unif2ace.encoders.adapters import ClipVisionAdapter, OnnxFaceAdapter
from unif2ace.encoders.cnn import (
    ArcFaceHead,
    IdentityEncoder,
    SemanticEncoder,
    attribute_loss,
    to_tensor,
)
from unif2ace.encoders.train import (
    attribute_accuracy,
    batched,
    cache_embeddings,
    load_embeddings,
    roc_auc,
    train_identity,
    train_semantic,
    verification_auc,
)
from unif2ace.eval.judge import AttributeJudge, judge_accuracy, judge_predict, train_judge
from unif2ace.io import load_pretrained_state, save_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def faces():
    return draw_arrays(48, seed=9, images_per_identity=4, workers=1)


def test_to_tensor_range(faces):
    x = to_tensor(faces.images[:2])
    assert x.shape == (2, 3, 64, 64) and -1 <= x.min() and x.max() <= 1


def test_encoder_shapes_and_unit_embeddings(faces):
    x = to_tensor(faces.images[:5])
    sem, ide = SemanticEncoder(width=8).eval(), IdentityEncoder(width=8).eval()
    logits = sem(x)
    assert [lg.shape for lg in logits] == [(5, n) for n in NUM_VALUES]
    for e in (sem.embed(x), ide.embed(x)):
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(5))
    # other input sizes are resized to the encoder's
    assert sem.embed(torch.zeros(2, 3, 96, 96)).shape == (2, 256)


def test_attribute_loss_ignores_hidden():
    logits = [torch.randn(4, n, requires_grad=True) for n in NUM_VALUES]
    labels = torch.full((4, len(NUM_VALUES)), -1)
    labels[:, 0] = torch.tensor([0, 1, 2, 0])
    loss = attribute_loss(logits, labels)
    loss.backward()
    assert logits[1].grad is None or logits[1].grad.abs().sum() == 0
    assert logits[0].grad.abs().sum() > 0


def test_arcface_margin():
    head = ArcFaceHead(8, 5, s=10.0, m=0.3)
    emb = torch.randn(6, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    out = head(emb, y)
    cos = (
        torch.nn.functional.normalize(emb, dim=-1)
        @ torch.nn.functional.normalize(head.weight, dim=-1).T
    )
    true = out.gather(1, y[:, None]).squeeze(1)
    assert (true < 10 * cos.gather(1, y[:, None]).squeeze(1)).all()  # margin lowers the target
    mask = torch.ones_like(out, dtype=torch.bool).scatter(1, y[:, None], False)
    torch.testing.assert_close(out[mask], 10 * cos[mask])


def test_roc_auc_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(60, generator=g).round(decimals=1)  # with ties
    p = torch.rand(60, generator=g) < 0.4
    pos, neg = s[p], s[~p]
    brute = ((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert roc_auc(s, p) == pytest.approx(float(brute), abs=1e-12)
    assert roc_auc(torch.tensor([0.1, 0.2, 0.9, 0.8]), torch.tensor([0, 0, 1, 1])) == 1.0
    with pytest.raises(ValueError):
        roc_auc(torch.ones(3), torch.ones(3))


def test_verification_auc_perfect_for_identity_embeddings():
    ids = np.repeat(np.arange(5), 3)
    emb = torch.eye(8)[ids] + 0.01 * torch.randn(15, 8)
    res = verification_auc(emb, ids)
    assert res["roc_auc"] == 1.0 and res["pairs"] == 105 and res["positive_pairs"] == 15


def test_short_training_runs_and_saves(faces, tmp_path):
    sem, info = train_semantic(faces, steps=3, batch=8, width=8, progress=False)
    assert np.isfinite(info["final_loss"])
    ide, _ = train_identity(faces, steps=3, batch=8, width=8, progress=False)
    emb = batched(ide.embed, faces.images)
    assert emb.shape == (48, 128)
    acc = attribute_accuracy(batched(sem, faces.images), faces.labels)
    assert set(acc["per_attribute"]) <= {c.name for c in CATEGORIES} and 0 <= acc["mean"] <= 1
    save_pretrained(tmp_path / "sem", sem, sem.config)
    state, cfg = load_pretrained_state(tmp_path / "sem")
    sem2 = SemanticEncoder(cfg["width"], cfg["dim"], cfg["size"])
    sem2.load_state_dict(state)
    x = to_tensor(faces.images[:3])
    torch.testing.assert_close(sem2.eval().embed(x), sem.embed(x))


def test_embedding_cache_roundtrip(tmp_path):
    e = torch.randn(4, 16)
    cache_embeddings(tmp_path / "e.safetensors", e, ["a", "b", "c", "d"], {"encoder": "x"})
    e2, ids = load_embeddings(tmp_path / "e.safetensors")
    assert ids == ["a", "b", "c", "d"] and torch.equal(e, e2)


def test_judge_shapes_training_and_prediction(faces):
    j, info = train_judge(faces, steps=2, batch=8, progress=False)
    assert np.isfinite(info["final_loss"])
    pred = judge_predict(j, faces.images[:7])
    assert pred.shape == (7, len(CATEGORIES))
    assert (pred < np.array(NUM_VALUES)).all()
    acc = judge_accuracy(j, faces.images, faces.labels)
    assert 0 <= acc["mean"] <= 1
    # a different architecture from the semantic encoder
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in AttributeJudge().modules())


# ---- adapters ---------------------------------------------------------------------------------


def test_clip_vision_adapter_with_tiny_model(tmp_path, faces):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.CLIPVisionModelWithProjection(cfg).eval()
    model.save_pretrained(tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "crop_size": {"height": 32, "width": 32},
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
            }
        )
    )
    ad = ClipVisionAdapter(tmp_path / "clip")
    assert ad.size == 32 and ad.dim == 16
    e = ad.embed(faces.images[:3])
    assert e.shape == (3, 16)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    # same as running the model by hand on the same preprocessing
    x = torch.nn.functional.interpolate(
        torch.as_tensor(faces.images[:3]).permute(0, 3, 1, 2).float() / 255,
        size=(32, 32),
        mode="bicubic",
        align_corners=False,
        antialias=True,
    ).clamp(0, 1)
    with torch.no_grad():
        ref = model(pixel_values=(x - 0.5) / 0.5).image_embeds
    torch.testing.assert_close(e, torch.nn.functional.normalize(ref, dim=-1), atol=1e-5, rtol=1e-4)
    # [-1, 1] float tensors give the same result as uint8 arrays
    torch.testing.assert_close(ad.embed(to_tensor(faces.images[:3])), e, atol=1e-5, rtol=1e-4)
    with pytest.raises(FileNotFoundError):
        ClipVisionAdapter(tmp_path / "nope")


@pytest.mark.parametrize("batch", ["N", 4])
def test_onnx_face_adapter_with_tiny_model(tmp_path, faces, batch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    w = tiny_face_onnx(tmp_path / "face.onnx", batch=batch)
    ad = OnnxFaceAdapter(tmp_path / "face.onnx")
    assert ad.size == (112, 112) and ad.dim == 8
    e = ad.embed(faces.images[:6])  # 6 images: a fixed batch of 4 pads its last batch
    assert e.shape == (6, 8)
    # reference: mean of the normalised, resized image per channel, times w
    x = torch.as_tensor(faces.images[:6]).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(
        x, size=(112, 112), mode="bilinear", align_corners=False, antialias=True
    )
    ref = ((x - 127.5) / 127.5).mean((2, 3)).numpy() @ w
    torch.testing.assert_close(
        e, torch.nn.functional.normalize(torch.from_numpy(ref), dim=-1), atol=1e-4, rtol=1e-4
    )
    with pytest.raises(FileNotFoundError):
        OnnxFaceAdapter(tmp_path / "nope.onnx")
