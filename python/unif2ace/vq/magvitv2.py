"""The released MAGVIT-v2 image tokenizer (Show-o's ``showlab/magvitv2``): a VQGAN-style
convolutional autoencoder with a 13-bit lookup-free quantiser, ×16 down (256 px -> 16×16 codes,
512 px -> 32×32), 8192 codes.

This is a from-scratch implementation whose module tree reproduces the released state-dict key
names, so the released weights load as they are. :func:`load_magvitv2` reads a checkpoint folder,
checks every tensor against the architecture before anything is loaded, and returns a frozen,
eval-mode :class:`MagvitV2`.

Layout (key names; ``ch`` = 128, GroupNorm(32 groups, eps 1e-6) and swish throughout; every conv
has a bias; a "ResNet block" is ``norm1, conv1 (3×3), norm2, conv2 (3×3)`` plus a 1×1
``nin_shortcut`` when its input and output widths differ, output = shortcut(x) + conv2 branch):

* ``encoder.conv_in`` 3×3, 3 -> 128.
* ``encoder.down.{i}.block.{j}``, level i = 0..4 at width ``ch * [1, 2, 2, 4, 4][i]`` with
  ``[4, 3, 4, 3, 4][i]`` blocks (the first block of a level changes the width). Levels 0..3 end with
  ``encoder.down.{i}.downsample.conv``: pad right and bottom by one zero, then a 3×3 stride-2 conv
  without padding.
* ``encoder.mid.block_1``, ``encoder.mid.attn_1`` (``norm``; 1×1 ``q``, ``k``, ``v``,
  ``proj_out``; single-head softmax attention over the h·w positions, scale ``c**-0.5``, residual),
  ``encoder.mid.block_2``, all at 512.
* ``encoder.norm_out``, swish, ``encoder.conv_out`` (3×3, 512 -> 13), ``encoder.quant_conv``
  (1×1, 13 -> 13).
* ``quantize.embedding`` ``float [8192, 13]`` and ``quantize.power_vals`` ``int64 [13]``: buffers
  that only restate the bit convention below (a checkpoint may omit them; if present they are
  checked).
* ``decoder.post_quant_conv`` (1×1, 13 -> 13), ``decoder.conv_in`` (3×3, 13 -> 512),
  ``decoder.mid`` (as the encoder's), then ``decoder.up.{i}`` for i = 4 down to 0 (the index is the
  level, run from the coarsest): width ``ch * [1, 1, 2, 2, 4][i]`` with ``[4, 4, 3, 4, 3][i]``
  blocks; levels 4..1 end with ``decoder.up.{i}.upsample.conv`` (nearest ×2, then a 3×3 conv).
  Then ``decoder.norm_out``, swish, ``decoder.conv_out`` (3×3, 128 -> 3).
* There is no attention inside the levels (the release's ``attn_resolutions = [5]`` matches no
  level), so no ``down.{i}.attn`` / ``up.{i}.attn`` keys exist.

LFQ convention: bit ``c`` of a position is ``z_c > 0`` (0 counts as -1), the code is
``sum_c 2**(12 - c) * bit_c`` (channel 0 is the most significant bit), and the code's latent is
``2 * bit - 1`` per channel. Codes are flattened row-major over (h, w): ``int64 [B, h*w]``.

Pixels: the tokenizer takes ``[B, 3, H, W]`` in [-1, 1] (``(x - 0.5) / 0.5`` of [0, 1] RGB), H and
W multiples of 16. Show-o prepares an image with a short-side bicubic resize and a centre crop
(:func:`preprocess_image`). :meth:`MagvitV2.decode_code` returns the decoder's raw output, as
Show-o's does: approximately in [-1, 1] but not clamped; :func:`postprocess` maps it to pixels the
way Show-o's scripts do (``clamp((x + 1) / 2, 0, 1)``, ``* 255``, truncated to uint8).

Checkpoint folder: Show-o's ``MAGVITv2.from_pretrained`` reads ``config.json`` and
``pytorch_model.bin``; we also accept the safetensors names ``pytorch_model.safetensors``,
``model.safetensors`` and diffusers' ``diffusion_pytorch_model.{safetensors,bin}`` (safetensors
first). The released ``config.json`` holds no architecture fields (the class takes no arguments),
so the architecture is fixed by :class:`MagvitV2Config`; a ``config.json`` naming another class is
rejected.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# Weight file names tried in this order (safetensors first: no pickle).
WEIGHT_FILES = (
    "pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "pytorch_model.bin",
    "diffusion_pytorch_model.bin",
)
_DERIVED_BUFFERS = ("quantize.embedding", "quantize.power_vals")


@dataclass(frozen=True)
class MagvitV2Config:
    """The architecture; the defaults are the released tokenizer's. Widths must be multiples of 32
    (GroupNorm's 32 groups)."""

    ch: int = 128
    encoder_ch_mult: tuple[int, ...] = (1, 2, 2, 4, 4)
    encoder_num_res_blocks: tuple[int, ...] = (4, 3, 4, 3, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_num_res_blocks: tuple[int, ...] = (4, 4, 3, 4, 3)
    z_channels: int = 13  # LFQ bits
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self):
        for kind in ("encoder", "decoder"):
            mult = getattr(self, f"{kind}_ch_mult")
            blocks = getattr(self, f"{kind}_num_res_blocks")
            if len(mult) != len(blocks) or not mult:
                raise ValueError(f"{kind}: {len(mult)} multipliers but {len(blocks)} block counts")
            if any(self.ch * m % 32 for m in mult):
                raise ValueError(f"{kind} widths {[self.ch * m for m in mult]} must divide by 32")
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError("encoder and decoder need the same number of levels")
        if not 1 <= self.z_channels <= 62:
            raise ValueError(f"z_channels (LFQ bits) must be in [1, 62], got {self.z_channels}")

    @property
    def downsample(self) -> int:
        """Pixels per code along a side (16 for the release)."""
        return 2 ** (len(self.encoder_ch_mult) - 1)

    @property
    def codebook_size(self) -> int:
        return 2**self.z_channels


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock(nn.Module):
    """``x' = shortcut(x) + conv2(swish(norm2(conv1(swish(norm1(x))))))``."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h·w positions with 1×1 projections, residual."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v = (nn.Conv2d(c, c, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        # [B, 1, h*w, c]: one head, positions as the sequence; default scale is c**-0.5
        q, k, v = (p(n).reshape(b, 1, c, h * w).transpose(-1, -2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(a.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3×3 stride-2 conv (halves an even side)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution: ``block`` (ResNet blocks) and an optional ``downsample`` / ``upsample``."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(n_blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        for name in ("downsample", "upsample"):
            if name in self._modules:
                x = self._modules[name](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: MagvitV2Config):
        super().__init__()
        ch, mult = cfg.ch, cfg.encoder_ch_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        c_in = ch
        for i, (m, n) in enumerate(zip(mult, cfg.encoder_num_res_blocks)):
            level = _Level(c_in, ch * m, n)
            c_in = ch * m
            if i != len(mult) - 1:
                level.downsample = Downsample(c_in)
            self.down.append(level)
        self.mid = _Mid(c_in)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, 1, 1)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.conv_out(F.silu(self.norm_out(self.mid(h))))
        return self.quant_conv(h)


class Decoder(nn.Module):
    def __init__(self, cfg: MagvitV2Config):
        super().__init__()
        ch, mult = cfg.ch, cfg.decoder_ch_mult
        c_in = ch * mult[-1]
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, 1, 1)
        self.mid = _Mid(c_in)
        levels: list[nn.Module] = [nn.Module()] * len(mult)
        for i in reversed(range(len(mult))):  # built coarse -> fine, stored by level index
            levels[i] = _Level(c_in, ch * mult[i], cfg.decoder_num_res_blocks[i])
            c_in = ch * mult[i]
            if i != 0:
                levels[i].upsample = Upsample(c_in)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.out_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def lfq_tables(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``embedding`` ``float32 [2**bits, bits]`` of ±1, ``power_vals`` ``int64 [bits]``): row i of
    the embedding is code i's latent, channel 0 its most significant bit."""
    power_vals = 2 ** torch.arange(bits - 1, -1, -1, dtype=torch.int64)
    codes = torch.arange(2**bits, dtype=torch.int64)
    embedding = ((codes[:, None] // power_vals) % 2).float() * 2 - 1
    return embedding, power_vals


class LFQuantizer(nn.Module):
    """Lookup-free quantisation (inference only; no training losses)."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        embedding, power_vals = lfq_tables(bits)
        self.register_buffer("embedding", embedding)
        self.register_buffer("power_vals", power_vals)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` ``[B, bits, h, w]`` -> (``z_q`` ±1 of z's dtype, same shape; codes ``int64
        [B, h, w]``)."""
        bit = z > 0
        codes = (bit.long() * self.power_vals.view(1, -1, 1, 1)).sum(1)
        return torch.where(bit, 1.0, -1.0).to(z.dtype), codes

    def codes_to_latent(self, codes: torch.Tensor, dtype=None) -> torch.Tensor:
        """``int [B, h, w]`` codes -> ``[B, bits, h, w]`` of ±1 (from the bits; the same rows as
        ``embedding[codes]``)."""
        bit = (codes.long().unsqueeze(1) // self.power_vals.view(1, -1, 1, 1)) % 2
        return (bit * 2 - 1).to(dtype or self.embedding.dtype)


class MagvitV2(nn.Module):
    """The tokenizer: ``encoder`` -> ``quantize`` (LFQ) -> ``decoder``; see the module docstring."""

    def __init__(self, config: MagvitV2Config | None = None):
        super().__init__()
        self.config = cfg = config or MagvitV2Config()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = LFQuantizer(cfg.z_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def _check_pixels(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"pixels must be [B, {self.config.in_channels}, H, W], got {tuple(x.shape)}"
            )
        d = self.config.downsample
        if x.shape[2] % d or x.shape[3] % d:
            raise ValueError(f"H and W must be multiples of {d}, got {tuple(x.shape[2:])}")
        return x.to(self.dtype)

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in [-1, 1] -> the continuous latent before quantisation,
        ``[B, 13, H/16, W/16]`` (after ``quant_conv``)."""
        return self.encoder(self._check_pixels(x))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels -> (quantised latent ``[B, 13, h, w]`` of ±1, codes ``int64 [B, h*w]``)."""
        z_q, codes = self.quantize(self.encode_pre(x))
        return z_q, codes.flatten(1)

    @torch.no_grad()
    def get_code(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in [-1, 1] -> codes ``int64 [B, (H/16)·(W/16)]``, row-major."""
        return self.encode(x)[1]

    def codes_to_latent(self, codes: torch.Tensor, shape=None) -> torch.Tensor:
        """Codes ``[B, h*w]`` (or ``[B, h, w]``) -> ``[B, 13, h, w]`` of ±1 in the model's dtype.
        ``shape=(h, w)``; None means the codes' own grid, or a square ``sqrt(N)`` one for flat
        codes."""
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.dim() == 3 and shape is None:
            shape = tuple(codes.shape[1:])
        if codes.dim() not in (2, 3):
            raise ValueError(f"codes must be [B, h*w] or [B, h, w], got {tuple(codes.shape)}")
        b, n = codes.shape[0], codes[0].numel()
        if shape is None:
            s = math.isqrt(n)
            if s * s != n:
                raise ValueError(f"{n} codes per image are not a square grid; pass shape=(h, w)")
            shape = (s, s)
        h, w = shape
        if h * w != n:
            raise ValueError(f"shape {tuple(shape)} does not hold {n} codes")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.codebook_size):
            raise ValueError(f"codes must be in [0, {self.config.codebook_size})")
        return self.quantize.codes_to_latent(codes.reshape(b, h, w), self.dtype)

    @torch.no_grad()
    def decode_code(self, codes: torch.Tensor, shape=None) -> torch.Tensor:
        """Codes ``[B, h*w]`` (or ``[B, h, w]``) -> the decoder's raw output ``[B, 3, 16h, 16w]``
        (about [-1, 1], not clamped, as in Show-o). ``shape`` as in :meth:`codes_to_latent`."""
        return self.decoder(self.codes_to_latent(codes, shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of pixels through the quantiser (no straight-through gradient)."""
        z_q, _ = self.quantize(self.encode_pre(x))
        return self.decoder(z_q)


# --- loading --------------------------------------------------------------------------------------


def expected_state_shapes(config: MagvitV2Config | None = None) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the architecture and its shape, in module order."""
    return dict(_state_shapes(config or MagvitV2Config()))


@functools.lru_cache(maxsize=8)
def _state_shapes(config: MagvitV2Config) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):  # no memory allocated, no initialisation run
        model = MagvitV2(config)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _read_state(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            break
    else:
        raise ValueError(
            f"{folder} is not a MAGVIT-v2 checkpoint folder: none of {', '.join(WEIGHT_FILES)}"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state, path


def _check_config(folder: Path) -> None:
    path = folder / "config.json"
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    name = config.get("_class_name", config.get("model_type"))
    if name is not None and "magvit" not in str(name).lower():
        raise ValueError(f"{path} describes {name!r}, not a MAGVIT-v2 tokenizer")


def validate_state(
    state: dict[str, torch.Tensor], config: MagvitV2Config | None = None, source: str = "state"
) -> None:
    """Raise ``ValueError`` unless ``state`` holds exactly the architecture's tensors with their
    shapes (the LFQ buffers may be absent; if present they must match the bit convention). The
    message names each offending key with the expected and the found shape."""
    config = config or MagvitV2Config()
    expected = expected_state_shapes(config)
    present = [k for k in expected if k in state]
    if len(present) < len(expected) // 2:
        some = ", ".join(sorted(state)[:5]) or "no tensors"
        raise ValueError(
            f"{source} is not a MAGVIT-v2 checkpoint: {len(present)} of the {len(expected)} "
            f"expected keys present (found e.g. {some})"
        )
    errors = []
    for key, shape in expected.items():
        if key not in state:
            if key not in _DERIVED_BUFFERS:
                errors.append(f"missing key {key} (expected shape {shape})")
            continue
        t = state[key]
        if tuple(t.shape) != shape:
            errors.append(f"{key}: expected shape {shape}, found {tuple(t.shape)}")
        elif key not in _DERIVED_BUFFERS and not t.is_floating_point():
            errors.append(f"{key}: expected a floating-point tensor, found {t.dtype}")
    errors += [
        f"unexpected key {k} (shape {tuple(state[k].shape)})" for k in state if k not in expected
    ]
    if not errors:
        embedding, power_vals = lfq_tables(config.z_channels)
        for key, ref in zip(_DERIVED_BUFFERS, (embedding, power_vals)):
            if key in state and not torch.equal(state[key].to(ref.dtype), ref):
                errors.append(f"{key}: does not match the LFQ bit convention (channel 0 = MSB)")
    if errors:
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(
            f"{source} does not fit the MAGVIT-v2 architecture (z_channels={config.z_channels}, "
            f"ch={config.ch}):\n  " + "\n  ".join(errors[:20]) + more
        )


def load_magvitv2(
    folder, dtype: torch.dtype | None = None, device="cpu", config: MagvitV2Config | None = None
) -> MagvitV2:
    """A checkpoint folder -> an eval-mode :class:`MagvitV2` with ``requires_grad`` off.

    ``dtype`` (default float32) applies to the parameters and the embedding buffer. ``config``
    defaults to the released architecture. Everything is checked before anything is loaded: a
    folder without a weight file, weights of another model, a missing or unexpected key, a wrong
    shape (another channel count) or a ``config.json`` naming another class raise ``ValueError``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    config = config or MagvitV2Config()
    _check_config(folder)
    state, path = _read_state(folder)
    validate_state(state, config, source=str(path))
    dtype = dtype or torch.float32
    embedding, power_vals = lfq_tables(config.z_channels)
    state = dict(state)
    state["quantize.embedding"], state["quantize.power_vals"] = embedding, power_vals
    state = {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype).contiguous()
        for k, v in state.items()
    }
    with torch.device("meta"):
        model = MagvitV2(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# --- pixels ---------------------------------------------------------------------------------------


def preprocess_image(img, size: int = 256) -> torch.Tensor:
    """A PIL image, or ``uint8`` ``[H, W, 3]`` / ``[3, H, W]`` tensor or array -> ``float32
    [1, 3, size, size]`` in [-1, 1], as Show-o prepares images: RGB, short side resized to
    ``size`` (PIL bicubic; the long side to ``int(size * long / short)``), centre crop (offsets
    rounded as torchvision does), ``(x / 255 - 0.5) / 0.5``."""
    import numpy as np
    from PIL import Image

    if not isinstance(img, Image.Image):
        arr = img.detach().cpu().numpy() if torch.is_tensor(img) else np.asarray(img)
        if arr.dtype != np.uint8 or arr.ndim != 3 or 3 not in (arr.shape[0], arr.shape[-1]):
            raise TypeError(
                f"expected a PIL image or uint8 [H, W, 3] / [3, H, W], got {arr.dtype} "
                f"{tuple(arr.shape)}"
            )
        if arr.shape[-1] != 3:  # channels first
            arr = arr.transpose(1, 2, 0)
        img = Image.fromarray(np.ascontiguousarray(arr))
    img = img.convert("RGB")
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    return ((x - 0.5) / 0.5).unsqueeze(0)


def postprocess(x: torch.Tensor, uint8: bool = True) -> torch.Tensor:
    """Decoder output ``[B, 3, H, W]`` -> ``[B, H, W, 3]`` pixels on the CPU: ``clamp((x + 1) / 2,
    0, 1)``, then (``uint8=True``) ``* 255`` truncated to ``uint8`` as Show-o's scripts do, or
    (``uint8=False``) float32 in [0, 1]."""
    y = ((x.detach().float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).cpu()
    return (y * 255.0).to(torch.uint8) if uint8 else y.contiguous()
