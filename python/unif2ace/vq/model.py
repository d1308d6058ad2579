"""The image tokenizer: a small convolutional autoencoder with finite scalar quantisation
(``vector_quantize_pytorch.FSQ``, levels 8·8·8·8 = 4096 codes) by default, or a lookup-free
quantiser (``vector_quantize_pytorch.LFQ``, MAGVIT-v2's) — 64 px -> 16×16 tokens (8×8 optional).

Why 16×16 and not 8×8. Fewer tokens would be better for the model: it generates image tokens by
masked discrete diffusion, every decoding step runs the transformer over the whole sequence, and 64
tokens instead of 256 make a step's attention ~16× and its MLP/MoE work 4× cheaper. We started
there and measured it: an 8×8 LFQ tokenizer (10 bits a token, widths 16/32/64, 1500 steps of 24
images, 7.6 min on the shared 2-core machine) reconstructs at 20.4 dB PSNR and the attribute judge
reads only 79 % as many attributes from its reconstructions as from the originals (eye colour 45 %,
expression 31 %): 8×8 px patches of 10 bits cannot carry a 3 px iris, a brow's thickness and a
mouth's shape, and a CPU budget of minutes cannot train a decoder clever enough to make up for it.
16×16 tokens (4×4 px patches) keep those details at a quarter of the autoencoder's depth. The model
side stays affordable: 256 image tokens + ~64 text tokens is the ``tiny`` config's sequence. An 8×8
grid (``downsample=8``, three widths) remains available for larger images or GPUs.

Why FSQ by default. Same 16×16 grid, widths 24/48, 1500 steps of 24 images: LFQ (1024 codes,
entropy loss 0.1) 22.3 dB in 14.3 min; FSQ (1000 codes, no auxiliary loss: the whole gradient goes
to reconstruction) 24.3 dB, 93 % of the codes used, in 5.8 min. FSQ 8·5·5·5 at 3000 steps: 25.4 dB,
99.2 % of the codes used on the test split, 7.9 min wall (4.2 CPU min, one thread) — and the judge
reads 90.7 % as many attributes from its reconstructions as from the originals (hair texture and
mouth shape suffer most).

The default now (measured on the shared 2-core machine, one thread, judge at 98.6 % on the test
originals): FSQ 8·8·8·5 (2560 codes, 11.3 bits a token), same widths, an EMA (0.999) of the weights,
up to 10 000 steps of 24 images with a 14 CPU-minute budget that the learning-rate schedule follows:
9408 steps in 14.0 CPU min (19.9 min wall under a load average of 3–7), 26.9 dB, 97.9 % of the codes
used, judge ratio 0.934 (hair style 0.63, expression 0.77, lipstick 0.86 read on reconstructions)
— better on every figure but still short of the 95 % asked for. At 1500 steps the same comparison
measured: 8·5·5·5 24.3 dB / ratio 0.883; 8·8·8·5 24.4 dB / 0.887; + an L1 loss on pixel
differences (weight 0.5) 24.2 dB / 0.873 — more bits alone barely help a short run and the edge
loss did not help, so it is off (``edge_weight``). Wider / deeper decoders (``decoder_channels``,
``decoder_blocks``) cost ~45 % more per step and were not measured to the end yet. The lever still
open is CPU: the hair-style strokes are 1–2 px dark lines on hair of a similar colour.
``--preset fast`` (1500 steps, 4 wall min budget) trains a usable demo tokenizer.

The perceptual loss (2026-11-29, ``vq.train.SemanticPerceptualLoss``, weight 0.2, on by default):
the frozen semantic encoder's channel-normalised feature maps and attribute-head distributions on
the reconstruction are pulled to those on the original — VQGAN's LPIPS term with our CLIP stand-in
as the feature net; the judge is never used. On the demo's data (judge 97.2 % on originals), 1500
steps: ratio 0.894 without it, 0.918 at weight 0.2 (0.911 at 1.0; heavier head KL 0.902–0.911),
for ~60 % more time a step. With the 14 CPU-minute budget on a fresh ``data-all`` (10 000 images,
judge 98.6 %): 8146 steps, 25.5 dB, 97.7 % of the codes used, ratio 0.948 (hair style 0.61,
expression 0.81, glasses 0.86). The semantic encoder itself reads hair style from those
reconstructions at 91 % (95 % on originals): what the judge misses are the 1–2 px strands, drawn
blocky. Adding the identity encoder's features as well: 6672 steps, ratio 0.943. Channels-last
convolutions (``train_vq``) take ~8 % less CPU a step; 14.8 CPU minutes then ran 9549 steps: 25.7
dB, ratio 0.948 again — the ratio has plateaued in steps at this size. A wider decoder (widths
32/64): 7482 steps in 14 CPU minutes, 25.9 dB, ratio 0.949 (hair style 0.56).
FSQ 8·8·8·8 (4096 codes, 12 bits a token), the default since: 8849 steps in 14 CPU minutes, 25.7
dB, 95.0 % of the codes used, ratio 0.951 (hair style 0.64) — the first run at the target, by a
hair; see the README for the repeat through ``unif2ace train-vq``.

Token ids are ``int64 [B, h, w]`` in ``[0, codebook_size)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VQConfig:
    size: int = 64  # image side in pixels
    downsample: int = 4  # 64 / 4 = 16×16 tokens
    channels: tuple[int, ...] = (24, 48)  # widths at 1/2, 1/4 (, 1/8) resolution
    quantizer: str = "fsq"  # "fsq" or "lfq"
    codebook_bits: int = 10  # lfq: codebook of 2**bits entries
    fsq_levels: tuple[int, ...] = (8, 8, 8, 8)  # fsq: codebook of prod(levels) entries
    entropy_loss_weight: float = 0.1  # lfq: entropy (codebook-usage) loss
    commitment_loss_weight: float = 0.25  # lfq
    # decoder widths, one per resolution like ``channels`` (empty: the encoder's), and residual
    # blocks at the token grid / at each upsampled resolution
    decoder_channels: tuple[int, ...] = ()
    decoder_blocks: int = 2
    decoder_stage_blocks: int = 1

    @property
    def tokens_side(self) -> int:
        return self.size // self.downsample

    @property
    def codebook_size(self) -> int:
        if self.quantizer == "lfq":
            return 2**self.codebook_bits
        return math.prod(self.fsq_levels)

    @property
    def code_dim(self) -> int:
        return self.codebook_bits if self.quantizer == "lfq" else len(self.fsq_levels)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("channels", "fsq_levels", "decoder_channels"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VQConfig:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("channels", "fsq_levels", "decoder_channels"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


class _Res(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(8, c), nn.Conv2d(c, c, 3, 1, 1)
        self.n2, self.c2 = nn.GroupNorm(8, c), nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return x + self.c2(F.silu(self.n2(self.c1(F.silu(self.n1(x))))))


class VQAutoencoder(nn.Module):
    """Encoder (strided convs + residual blocks) -> quantiser -> decoder (nearest upsampling +
    convs, pixel shuffle for the last ×2, so no conv runs at full resolution: at 64 px that is the
    most expensive layer a CPU would otherwise run)."""

    def __init__(self, config: VQConfig | None = None):
        super().__init__()
        self.config = cfg = config or VQConfig()
        n_down = int(math.log2(cfg.downsample))
        if 2**n_down != cfg.downsample or len(cfg.channels) != n_down:
            raise ValueError(f"downsample={cfg.downsample} needs len(channels) == log2 of it")
        if cfg.size % cfg.downsample:
            raise ValueError(f"size {cfg.size} is not a multiple of downsample {cfg.downsample}")
        ch = cfg.channels
        enc: list[nn.Module] = [nn.Conv2d(3, ch[0], 3, 2, 1)]
        for i in range(1, n_down):
            enc += [nn.SiLU(), nn.Conv2d(ch[i - 1], ch[i], 3, 2, 1), _Res(ch[i])]
        enc += [
            _Res(ch[-1]),
            nn.GroupNorm(8, ch[-1]),
            nn.SiLU(),
            nn.Conv2d(ch[-1], cfg.code_dim, 1),
        ]
        self.encoder = nn.Sequential(*enc)
        dch = cfg.decoder_channels or ch
        if len(dch) != n_down:
            raise ValueError(f"decoder_channels needs {n_down} widths, got {len(dch)}")
        dec: list[nn.Module] = [nn.Conv2d(cfg.code_dim, dch[-1], 3, 1, 1)]
        dec += [_Res(dch[-1]) for _ in range(cfg.decoder_blocks)]
        for i in range(n_down - 1, 0, -1):
            dec += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(dch[i], dch[i - 1], 3, 1, 1),
            ]
            dec += [_Res(dch[i - 1]) for _ in range(cfg.decoder_stage_blocks)]
        dec += [
            nn.GroupNorm(8, dch[0]),
            nn.SiLU(),
            nn.Conv2d(dch[0], 3 * 4, 3, 1, 1),
            nn.PixelShuffle(2),
        ]
        self.decoder = nn.Sequential(*dec)
        if cfg.quantizer == "lfq":
            from vector_quantize_pytorch import LFQ

            self.quantizer = LFQ(
                dim=cfg.code_dim,
                codebook_size=cfg.codebook_size,
                entropy_loss_weight=cfg.entropy_loss_weight,
                commitment_loss_weight=cfg.commitment_loss_weight,
                channel_first=True,
            )
        elif cfg.quantizer == "fsq":
            from vector_quantize_pytorch import FSQ

            self.quantizer = FSQ(levels=list(cfg.fsq_levels), dim=cfg.code_dim, channel_first=True)
        else:
            raise ValueError(f"quantizer must be 'lfq' or 'fsq', got {cfg.quantizer!r}")

    # [B, 3, H, W] in [-1, 1] -> (quantised [B, d, h, w], ids [B, h, w], aux loss)
    def quantize(self, x: torch.Tensor):
        z = self.encoder(x)
        if self.config.quantizer == "lfq":
            q, ids, aux = self.quantizer(z)
        else:
            q, ids = self.quantizer(z)
            aux = z.new_zeros(())
        return q, ids, aux

    def forward(self, x: torch.Tensor):
        """-> (reconstruction [B, 3, H, W], ids [B, h, w], aux loss)"""
        q, ids, aux = self.quantize(x)
        return self.decoder(q), ids, aux

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """images ``float [B, 3, H, W]`` in [-1, 1] -> token ids ``int64 [B, h, w]``."""
        return self.quantize(x)[1].long()

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """token ids ``[B, h, w]`` (or ``[B, h*w]``) -> images ``float [B, 3, H, W]`` in [-1, 1]."""
        s = self.config.tokens_side
        ids = ids.reshape(ids.shape[0], s, s).long()
        q = self.quantizer.indices_to_codes(ids)  # [B, d, h, w] (both built channel_first)
        return self.decoder(q.float()).clamp(-1, 1)

    @torch.no_grad()
    def code_vectors(self) -> torch.Tensor:
        """The quantiser's vector of every codebook entry, ``float [codebook_size, code_dim]``."""
        ids = torch.arange(self.config.codebook_size).view(1, -1, 1)
        return self.quantizer.indices_to_codes(ids)[0, :, :, 0].T.float().contiguous()

    # --- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, folder) -> None:
        from unif2ace.data.io import save_pretrained

        save_pretrained(folder, self, {"model_type": "unif2ace-vq", **self.config.to_dict()})

    @classmethod
    def from_pretrained(cls, folder) -> VQAutoencoder:
        from unif2ace.data.io import load_pretrained_state

        state, config = load_pretrained_state(folder)
        model = cls(VQConfig.from_dict(config))
        model.load_state_dict(state)
        return model.eval()
