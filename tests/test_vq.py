"""Image tokenizer: shapes and id ranges, encode/decode consistency, save/load (safetensors +
config.json), resume after a kill, metrics."""

import json

import numpy as np
import pytest
import torch

from unif2ace.data.synthface import draw_arrays
from unif2ace.encoders.cnn import SemanticEncoder, to_tensor
from unif2ace.vq.model import VQAutoencoder, VQConfig
from unif2ace.vq.train import SemanticPerceptualLoss, evaluate_vq, psnr, reconstruct, train_vq

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def faces():
    return draw_arrays(24, seed=5, workers=1).images


@pytest.mark.parametrize("quantizer,bits,side", [("lfq", 10, 8), ("fsq", 10, 8), ("lfq", 6, 16)])
def test_shapes_and_ids(quantizer, bits, side):
    ds = 64 // side
    cfg = VQConfig(
        quantizer=quantizer,
        codebook_bits=bits,
        downsample=ds,
        channels=(16, 32, 64)[: int(np.log2(ds))],
    )
    m = VQAutoencoder(cfg).eval()
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    rec, ids, aux = m(x)
    assert rec.shape == x.shape and ids.shape == (3, side, side)
    assert torch.isfinite(aux)
    t = m.encode(x)
    assert t.dtype == torch.int64 and 0 <= t.min() and t.max() < cfg.codebook_size
    # decode(encode(x)) is the forward reconstruction; flat [B, h*w] ids decode the same
    torch.testing.assert_close(m.decode(t), rec.clamp(-1, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.decode(t.flatten(1)), m.decode(t))


def test_bad_config():
    with pytest.raises(ValueError, match="channels"):
        VQAutoencoder(VQConfig(downsample=8, channels=(32, 64)))
    with pytest.raises(ValueError, match="quantizer"):
        VQAutoencoder(VQConfig(quantizer="kmeans"))


def test_save_load_roundtrip(tmp_path):
    m = VQAutoencoder(VQConfig(quantizer="fsq")).eval()
    m.save_pretrained(tmp_path / "vq")
    cfg = json.loads((tmp_path / "vq" / "config.json").read_text())
    assert cfg["quantizer"] == "fsq" and cfg["model_type"] == "unif2ace-vq"
    assert (tmp_path / "vq" / "model.safetensors").is_file()
    assert not list((tmp_path / "vq").glob("*.tmp*"))
    m2 = VQAutoencoder.from_pretrained(tmp_path / "vq")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(m.encode(x), m2.encode(x))
    with pytest.raises(FileNotFoundError, match="config.json"):
        VQAutoencoder.from_pretrained(tmp_path)


def test_train_resumes_after_a_kill(faces, tmp_path):
    cfg = VQConfig()
    ref, info = train_vq(faces, cfg, steps=4, batch=4, seed=3, progress=False)
    assert info["steps_done"] == 4 and np.isfinite(info["final_loss"])
    # "killed" after the first step (the time limit writes the state and stops) ...
    _, part = train_vq(
        faces, cfg, steps=4, batch=4, seed=3, out=tmp_path, max_minutes=0.0, progress=False
    )
    assert part["stopped_early"] and part["steps_done"] == 1
    state = torch.load(tmp_path / "train_state.pt", weights_only=False)
    assert state["step"] == 1
    # ... and resumed: same weights as the uninterrupted run
    resumed, info2 = train_vq(faces, cfg, steps=4, batch=4, seed=3, out=tmp_path, progress=False)
    assert info2["steps_done"] == 4 and not info2["stopped_early"]
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "train_info.json").is_file()


def test_metrics(faces):
    m = VQAutoencoder(VQConfig()).eval()
    metrics, recs = evaluate_vq(m, faces[:8])
    assert recs.shape == faces[:8].shape and recs.dtype == np.uint8
    assert 0 < metrics["codebook_usage"] <= 1 and metrics["tokens_per_image"] == 256
    assert np.isfinite(metrics["psnr_db"])
    assert psnr(faces[:2], faces[:2]) > 90
    r2, ids = reconstruct(m, faces[:3])
    assert ids.shape == (3, 16, 16)


def test_decoder_options_ema_edge_and_cpu_budget(faces, tmp_path):
    cfg = VQConfig(fsq_levels=(8, 8, 8, 5), decoder_channels=(16, 32), decoder_blocks=1)
    assert cfg.codebook_size == 2560
    with pytest.raises(ValueError, match="decoder_channels"):
        VQAutoencoder(VQConfig(decoder_channels=(16,)))
    m, info = train_vq(
        faces, cfg, steps=3, batch=4, ema_decay=0.9, edge_weight=0.5, out=tmp_path, progress=False
    )
    assert info["steps_done"] == 3 and np.isfinite(info["final_loss"]) and info["cpu_seconds"] > 0
    m2 = VQAutoencoder.from_pretrained(tmp_path)  # the EMA weights are what is saved
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert m2.config == cfg
    # a spent CPU budget stops after one step
    _, part = train_vq(faces, cfg, steps=4, batch=4, max_cpu_minutes=0.0, progress=False)
    assert part["stopped_early"] and part["steps_done"] == 1


def test_semantic_perceptual_loss(faces, tmp_path):
    torch.manual_seed(0)
    enc = SemanticEncoder(width=8, dim=32)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    loss = SemanticPerceptualLoss(enc)
    loss.train()  # the encoder stays in eval mode: its BatchNorm statistics are not updated
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    x = to_tensor(faces[:4])
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    rec = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    d = loss(rec, x)
    assert float(d) > 0
    d.backward()
    assert rec.grad is not None and rec.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.parameters())
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(v, before[k])
    # a closer reconstruction is closer
    assert float(loss(x + 0.05 * torch.randn_like(x), x)) < float(d)
    with pytest.raises(ValueError, match="64 px"):
        loss(x[..., :32, :32], x[..., :32, :32])
    # in training: steps run, the weight is reported
    m, info = train_vq(
        faces, VQConfig(), steps=2, batch=4, perceptual=loss, perceptual_weight=0.5, progress=False
    )
    assert info["perceptual_weight"] == 0.5 and np.isfinite(info["final_loss"])


def test_code_vectors_match_decode():
    m = VQAutoencoder(VQConfig(fsq_levels=(4, 3, 5)))
    v = m.code_vectors()
    assert v.shape == (60, 3) and len(torch.unique(v, dim=0)) == 60
    ids = torch.tensor([[[7]]])
    torch.testing.assert_close(m.quantizer.indices_to_codes(ids)[0, :, 0, 0], v[7])
