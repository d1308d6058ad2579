"""The released MAGVIT-v2 tokenizer (Show-o's ``showlab/magvitv2``): checkpoints written here in
the released key layout with random weights load back; the forward pass equals an independent,
functional float64 computation read straight from the state dict; the LFQ bit order; the loader's
refusals; the pixel pre- and post-processing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from unif2ace.vq.magvitv2 import (
    MagvitV2,
    MagvitV2Config,
    expected_state_shapes,
    lfq_tables,
    load_magvitv2,
    postprocess,
    preprocess_image,
    validate_state,
)
from unif2ace.vq.model import VQAutoencoder, VQConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# All five levels (×16 down, 13 bits) with narrow widths and few blocks: 64 px -> 4×4 codes fast.
# The first block of encoder levels 1 and 3 and of decoder levels 3 and 1 changes the width.
MINI = MagvitV2Config(
    ch=32, encoder_num_res_blocks=(1, 2, 1, 1, 2), decoder_num_res_blocks=(2, 1, 1, 2, 1)
)
RELEASE_CONFIG_JSON = {"_class_name": "MAGVITv2", "_version": "0.0.1"}


def random_state(config: MagvitV2Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the released layout: uniform in ±1/sqrt(fan_in) for convs, 1 ± 0.1 for
    the norms' scales, plus the LFQ buffers."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in expected_state_shapes(config).items():
        if key.startswith("quantize."):
            continue
        t = torch.empty(shape).uniform_(-1, 1, generator=g)
        if len(shape) == 4:
            t *= (shape[1] * shape[2] * shape[3]) ** -0.5
        elif key.endswith("weight"):  # GroupNorm scale
            t = 1 + 0.1 * t
        else:
            t *= 0.1
        state[key] = t
    state["quantize.embedding"], state["quantize.power_vals"] = lfq_tables(config.z_channels)
    return state


def write_checkpoint(folder, state, name="pytorch_model.bin", config=RELEASE_CONFIG_JSON):
    folder.mkdir(parents=True, exist_ok=True)
    if name.endswith(".safetensors"):
        save_file(state, str(folder / name))
    else:
        torch.save(state, folder / name)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


# --- an independent functional computation (float64, from the state dict's key names) -----------


def _gn(x, sd, p):
    b, c, h, w = x.shape
    g = x.reshape(b, 32, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-6)
    return g.reshape(b, c, h, w) * sd[p + ".weight"].view(1, -1, 1, 1) + sd[p + ".bias"].view(
        1, -1, 1, 1
    )


def _conv(x, sd, p, stride=1, pad=None):
    w = sd[p + ".weight"]
    pad = w.shape[-1] // 2 if pad is None else pad
    return torch.nn.functional.conv2d(x, w, sd[p + ".bias"], stride=stride, padding=pad)


def _swish(x):
    return x * torch.sigmoid(x)


def _res(x, sd, p):
    h = _conv(_swish(_gn(x, sd, p + ".norm1")), sd, p + ".conv1")
    h = _conv(_swish(_gn(h, sd, p + ".norm2")), sd, p + ".conv2")
    short = _conv(x, sd, p + ".nin_shortcut") if p + ".nin_shortcut.weight" in sd else x
    return short + h


def _attn(x, sd, p):
    b, c, hh, ww = x.shape
    n = _gn(x, sd, p + ".norm")
    q, k, v = (_conv(n, sd, f"{p}.{s}").reshape(b, c, hh * ww) for s in "qkv")
    a = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * c**-0.5, dim=2)  # [b, query, key]
    h = torch.bmm(v, a.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv(h, sd, p + ".proj_out")


def _mid(x, sd, p):
    return _res(_attn(_res(x, sd, p + ".block_1"), sd, p + ".attn_1"), sd, p + ".block_2")


def _blocks(x, sd, p):
    j = 0
    while f"{p}.block.{j}.conv1.weight" in sd:
        x = _res(x, sd, f"{p}.block.{j}")
        j += 1
    return x


def ref_encode(sd, x, levels=5):
    h = _conv(x, sd, "encoder.conv_in")
    for i in range(levels):
        h = _blocks(h, sd, f"encoder.down.{i}")
        if f"encoder.down.{i}.downsample.conv.weight" in sd:
            h = torch.nn.functional.pad(h, (0, 1, 0, 1))
            h = _conv(h, sd, f"encoder.down.{i}.downsample.conv", stride=2, pad=0)
    h = _mid(h, sd, "encoder.mid")
    h = _conv(_swish(_gn(h, sd, "encoder.norm_out")), sd, "encoder.conv_out")
    return _conv(h, sd, "encoder.quant_conv")


def ref_codes(z):
    """Horner's rule over the channels: channel 0 ends up the most significant bit."""
    code = torch.zeros(z.shape[0], *z.shape[2:], dtype=torch.int64)
    for c in range(z.shape[1]):
        code = code * 2 + (z[:, c] > 0).long()
    return code.flatten(1)


def ref_decode(sd, codes, side, bits=13, levels=5):
    grid = codes.reshape(codes.shape[0], side, side)
    z = torch.stack([((grid >> (bits - 1 - c)) & 1) * 2 - 1 for c in range(bits)], 1).double()
    h = _conv(_conv(z, sd, "decoder.post_quant_conv"), sd, "decoder.conv_in")
    h = _mid(h, sd, "decoder.mid")
    for i in reversed(range(levels)):
        h = _blocks(h, sd, f"decoder.up.{i}")
        if f"decoder.up.{i}.upsample.conv.weight" in sd:
            h = h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
            h = _conv(h, sd, f"decoder.up.{i}.upsample.conv")
    return _conv(_swish(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out")


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    state = random_state(MINI, seed=1)
    folder = write_checkpoint(tmp_path_factory.mktemp("mini"), state)
    return folder, state


# --- the released size ------------------------------------------------------------------------


# Independent restatement of the release (Show-o's VQGANEncoder / VQGANDecoder defaults).
RELEASE_SHAPES = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.0.block.3.conv2.weight": (128, 128, 3, 3),
    "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.down.1.block.0.conv1.weight": (256, 128, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.3.block.0.nin_shortcut.weight": (512, 256, 1, 1),
    "encoder.down.3.downsample.conv.weight": (512, 512, 3, 3),
    "encoder.down.4.block.3.norm2.weight": (512,),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (13, 512, 3, 3),
    "encoder.quant_conv.weight": (13, 13, 1, 1),
    "quantize.embedding": (8192, 13),
    "quantize.power_vals": (13,),
    "decoder.post_quant_conv.weight": (13, 13, 1, 1),
    "decoder.conv_in.weight": (512, 13, 3, 3),
    "decoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
    "decoder.up.4.block.2.conv1.weight": (512, 512, 3, 3),
    "decoder.up.4.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.up.1.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.up.1.upsample.conv.weight": (128, 128, 3, 3),
    "decoder.up.0.block.3.conv2.weight": (128, 128, 3, 3),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}


def _n_blocks(keys, prefix):
    return len({k.split(".")[4] for k in keys if k.startswith(prefix + ".block.")})


def test_release_layout():
    shapes = expected_state_shapes()
    for key, shape in RELEASE_SHAPES.items():
        assert shapes[key] == shape, key
    assert [_n_blocks(shapes, f"encoder.down.{i}") for i in range(5)] == [4, 3, 4, 3, 4]
    assert [_n_blocks(shapes, f"decoder.up.{i}") for i in range(5)] == [4, 4, 3, 4, 3]
    down = [i for i in range(5) if f"encoder.down.{i}.downsample.conv.weight" in shapes]
    up = [i for i in range(5) if f"decoder.up.{i}.upsample.conv.weight" in shapes]
    assert down == [0, 1, 2, 3] and up == [1, 2, 3, 4]
    assert not any(".attn." in k for k in shapes)  # attention only in mid
    norms = [m for m in MagvitV2(MINI).modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 and m.eps == 1e-6 for m in norms)


def test_release_size_checkpoint_loads_and_runs(tmp_path):
    state = random_state(MagvitV2Config())
    write_checkpoint(tmp_path, state)
    model = load_magvitv2(tmp_path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key in ("encoder.conv_in.weight", "decoder.up.3.block.0.nin_shortcut.weight"):
        assert torch.equal(loaded[key], state[key])
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    codes = model.get_code(x)
    assert codes.shape == (1, 4) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < 8192
    out = model.decode_code(codes)
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


@pytest.mark.slow
def test_release_size_64px(tmp_path):
    write_checkpoint(tmp_path, random_state(MagvitV2Config()), "pytorch_model.safetensors")
    model = load_magvitv2(tmp_path)
    codes = model.get_code(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert codes.shape == (2, 16) and 0 <= codes.min() and codes.max() < 8192
    assert model.decode_code(codes).shape == (2, 3, 64, 64)


# --- forward pass against the functional computation --------------------------------------------


def test_forward_matches_functional_reference(mini):
    folder, state = mini
    model = load_magvitv2(folder, dtype=torch.float64, config=MINI)
    sd = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64) * 2 - 1
    z_ref = ref_encode(sd, x)
    z = model.encode_pre(x)
    assert z.shape == (2, 13, 4, 4)
    torch.testing.assert_close(z, z_ref, rtol=1e-9, atol=1e-9)
    codes = model.get_code(x)
    assert codes.shape == (2, 16) and torch.equal(codes, ref_codes(z_ref))
    out = model.decode_code(codes)
    assert out.shape == (2, 3, 64, 64)
    torch.testing.assert_close(out, ref_decode(sd, codes, 4), rtol=1e-9, atol=1e-9)


def test_one_resnet_block_and_attention_explicit():
    """A width-changing ResNet block and the attention block against the explicit formulas."""
    model = MagvitV2(MINI).double()
    sd = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases
            p.add_(torch.randn_like(p) * 0.1)
        x = torch.randn(2, 32, 8, 8, dtype=torch.float64)
        got = model.encoder.down[1].block[0](x)
        torch.testing.assert_close(
            got, _res(x, sd, "encoder.down.1.block.0"), rtol=1e-10, atol=1e-12
        )
        y = torch.randn(2, 128, 3, 5, dtype=torch.float64)
        got = model.encoder.mid.attn_1(y)
        torch.testing.assert_close(got, _attn(y, sd, "encoder.mid.attn_1"), rtol=1e-10, atol=1e-12)


def test_roundtrip_shapes_and_code_forms(mini):
    folder, _ = mini
    model = load_magvitv2(folder, config=MINI)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    codes = model.get_code(x)
    assert codes.shape == (3, 16) and 0 <= codes.min() and codes.max() < 8192
    out = model.decode_code(codes)
    assert out.shape == (3, 3, 64, 64) and out.dtype == torch.float32
    torch.testing.assert_close(model.decode_code(codes.view(3, 4, 4)), out)
    # a non-square grid: 32×64 px -> 2×4 codes, decoded with shape=(2, 4)
    wide = model.get_code(torch.rand(1, 3, 32, 64) * 2 - 1)
    assert wide.shape == (1, 8)
    assert model.decode_code(wide, shape=(2, 4)).shape == (1, 3, 32, 64)
    with pytest.raises(ValueError, match="square"):
        model.decode_code(wide)
    with pytest.raises(ValueError, match=r"\[0, 8192\)"):
        model.decode_code(torch.full((1, 16), 8192))
    with pytest.raises(TypeError):
        model.decode_code(codes.float())
    with pytest.raises(ValueError, match="multiples of 16"):
        model.get_code(torch.zeros(1, 3, 40, 64))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.get_code(torch.zeros(1, 4, 64, 64))


# --- LFQ ----------------------------------------------------------------------------------------


def test_lfq_bit_order():
    q = MagvitV2(MINI).quantize
    z = torch.full((5, 13, 1, 1), -1.0)
    z[1, 0] = 2.0  # channel 0 alone -> the most significant bit
    z[2, 12] = 0.5  # channel 12 alone -> the least significant bit
    z[3] = 0.0  # exactly zero counts as a 0 bit
    z[4, [0, 2, 12]] = 1.0
    z_q, codes = q(z)
    assert codes.flatten().tolist() == [0, 4096, 1, 0, 4096 + 1024 + 1]
    assert torch.equal(z_q, torch.where(z > 0, 1.0, -1.0))
    zr = torch.randn(2, 13, 3, 3)
    _, codes = q(zr)
    explicit = [
        sum(2 ** (12 - c) for c in range(13) if zr[b, c, i, j] > 0)
        for b in range(2)
        for i in range(3)
        for j in range(3)
    ]
    assert codes.flatten().tolist() == explicit
    back = q.codes_to_latent(codes)
    assert torch.equal(back, torch.where(zr > 0, 1.0, -1.0))


def test_embedding_buffer_convention():
    emb, power = lfq_tables(13)
    q = MagvitV2(MINI).quantize
    assert torch.equal(q.embedding, emb) and torch.equal(q.power_vals, power)
    assert emb.shape == (8192, 13) and power.tolist() == [2 ** (12 - c) for c in range(13)]
    for i in (0, 1, 2, 4096, 5461, 8191):
        assert emb[i].tolist() == [1.0 if (i >> (12 - c)) & 1 else -1.0 for c in range(13)]
    codes = torch.randint(0, 8192, (2, 4, 4))
    assert torch.equal(q.codes_to_latent(codes), emb[codes].permute(0, 3, 1, 2))
    all_codes = torch.arange(8192).view(1, 8192, 1)
    assert torch.equal(q(q.codes_to_latent(all_codes))[1], all_codes)


# --- loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin"]
)
def test_other_file_names_and_dtype(tmp_path, mini, name):
    _, state = mini
    write_checkpoint(tmp_path, state, name, config=None)
    model = load_magvitv2(tmp_path, dtype=torch.bfloat16, config=MINI)
    assert model.encoder.conv_in.weight.dtype == torch.bfloat16
    assert model.quantize.embedding.dtype == torch.bfloat16
    assert model.quantize.power_vals.dtype == torch.int64
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert model.get_code(x).shape == (1, 16)


def test_lfq_buffers_may_be_absent(tmp_path, mini):
    _, state = mini
    state = {k: v for k, v in state.items() if not k.startswith("quantize.")}
    model = load_magvitv2(write_checkpoint(tmp_path, state), config=MINI)
    assert torch.equal(model.quantize.embedding, lfq_tables(13)[0])


def test_missing_key(tmp_path, mini):
    _, state = mini
    state = dict(state)
    del state["decoder.up.2.block.0.conv2.weight"]
    with pytest.raises(ValueError, match=r"missing key decoder\.up\.2\.block\.0\.conv2\.weight"):
        load_magvitv2(write_checkpoint(tmp_path, state), config=MINI)


def test_wrong_shape_names_key_and_shapes(tmp_path, mini):
    _, state = mini
    state = dict(state)
    state["encoder.mid.attn_1.k.weight"] = torch.zeros(128, 64, 1, 1)
    with pytest.raises(ValueError) as e:
        load_magvitv2(write_checkpoint(tmp_path, state), config=MINI)
    msg = str(e.value)
    assert (
        "encoder.mid.attn_1.k.weight: expected shape (128, 128, 1, 1), found (128, 64, 1, 1)" in msg
    )


def test_every_problem_is_reported_before_loading(tmp_path, mini):
    """Validation covers the whole state before a model exists: one error lists them all."""
    _, state = mini
    state = dict(state)
    del state["encoder.conv_in.bias"]
    state["decoder.conv_out.weight"] = torch.zeros(4, 32, 3, 3)
    state["encoder.down.0.attn.0.q.weight"] = torch.zeros(1)
    state["quantize.power_vals"] = 2 ** torch.arange(13)  # LSB first: the wrong convention
    with pytest.raises(ValueError) as e:
        load_magvitv2(write_checkpoint(tmp_path, state), config=MINI)
    msg = str(e.value)
    assert "missing key encoder.conv_in.bias" in msg
    assert "decoder.conv_out.weight: expected shape (3, 32, 3, 3), found (4, 32, 3, 3)" in msg
    assert "unexpected key encoder.down.0.attn.0.q.weight" in msg
    keep = expected_state_shapes(MINI)
    state = {k: v for k, v in state.items() if k in keep}
    state["encoder.conv_in.bias"] = torch.zeros(32)
    state["decoder.conv_out.weight"] = torch.zeros(3, 32, 3, 3)
    with pytest.raises(ValueError, match="quantize.power_vals: does not match"):
        validate_state(state, MINI)


def test_other_channel_counts_are_refused():
    """Release-size states with 12 LFQ bits, or a 64-wide first conv, against the release."""

    def empty_state(config):  # shapes only (the LFQ buffers are optional)
        shapes = expected_state_shapes(config)
        return {k: torch.empty(s) for k, s in shapes.items() if not k.startswith("quantize.")}

    with pytest.raises(ValueError) as e:
        validate_state(empty_state(MagvitV2Config(z_channels=12)))
    msg = str(e.value)
    assert "encoder.conv_out.weight: expected shape (13, 512, 3, 3), found (12, 512, 3, 3)" in msg
    assert (
        "decoder.post_quant_conv.weight: expected shape (13, 13, 1, 1), found (12, 12, 1, 1)" in msg
    )
    with pytest.raises(
        ValueError, match=r"conv_in\.weight: expected shape \(128, 3, 3, 3\), found \(64, 3, 3, 3\)"
    ):
        validate_state(empty_state(MagvitV2Config(ch=64)))
    validate_state(empty_state(MagvitV2Config()))  # the release itself passes


def test_other_bits_checkpoint_file(tmp_path):
    other = MagvitV2Config(**{**MINI.__dict__, "z_channels": 12})
    folder = write_checkpoint(tmp_path, random_state(other))
    with pytest.raises(ValueError, match=r"encoder\.quant_conv\.weight: expected shape \(13, 13"):
        load_magvitv2(folder, config=MINI)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        load_magvitv2(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="not a MAGVIT-v2 checkpoint folder"):
        load_magvitv2(empty)
    # our own FSQ tokenizer's folder: config.json names another model
    ours = tmp_path / "ours"
    VQAutoencoder(VQConfig()).save_pretrained(ours)
    with pytest.raises(ValueError, match="not a MAGVIT-v2 tokenizer"):
        load_magvitv2(ours)
    # the same weights without a config: the keys give it away
    (ours / "config.json").unlink()
    with pytest.raises(ValueError, match="is not a MAGVIT-v2 checkpoint"):
        load_magvitv2(ours)
    other = write_checkpoint(
        tmp_path / "vae", {"x": torch.zeros(1)}, config={"_class_name": "AutoencoderKL"}
    )
    with pytest.raises(ValueError, match="AutoencoderKL"):
        load_magvitv2(other)


# --- pixels -------------------------------------------------------------------------------------


def test_preprocess_centre_crop_and_range():
    rng = np.random.default_rng(0)
    tall = rng.integers(0, 256, (96, 64, 3), dtype=np.uint8)  # short side already 64: crop only
    x = preprocess_image(Image.fromarray(tall), 64)
    assert x.shape == (1, 3, 64, 64) and x.dtype == torch.float32
    want = torch.from_numpy(tall[16:80]).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(x[0], want, rtol=0, atol=1e-6)
    wide = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)
    want = torch.from_numpy(wide[:, 32:96]).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(
        preprocess_image(torch.from_numpy(wide), 64)[0], want, atol=1e-6, rtol=0
    )
    # uint8 tensor HWC, CHW and the PIL image agree; a resize keeps a flat colour flat
    img = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    a = preprocess_image(Image.fromarray(img), 32)
    b = preprocess_image(torch.from_numpy(img), 32)
    c = preprocess_image(torch.from_numpy(img).permute(2, 0, 1), 32)
    assert torch.equal(a, b) and torch.equal(a, c) and a.shape == (1, 3, 32, 32)
    assert -1 <= a.min() and a.max() <= 1
    flat = preprocess_image(Image.new("RGB", (300, 200), (255, 0, 51)), 64)
    torch.testing.assert_close(
        flat[0, :, 10, 10], torch.tensor([1.0, -1.0, -0.6]), atol=1e-6, rtol=0
    )
    gray = preprocess_image(Image.new("L", (64, 64), 255), 64)
    assert gray.shape == (1, 3, 64, 64) and bool((gray == 1).all())
    with pytest.raises(TypeError):
        preprocess_image(torch.rand(64, 64, 3), 64)


def test_postprocess():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).view(1, 3, 1, 2)
    u = postprocess(x)
    assert u.dtype == torch.uint8 and u.shape == (1, 1, 2, 3)
    # channel-last; (x + 1) / 2 * 255, clamped, truncated: 0 -> 127, 0.5 -> 191
    assert u[0, 0].tolist() == [[0, 127, 255], [0, 191, 255]]
    f = postprocess(x, uint8=False)
    assert f.dtype == torch.float32 and f.shape == (1, 1, 2, 3)
    torch.testing.assert_close(f[0, 0], torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.75, 1.0]]))
