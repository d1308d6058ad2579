"""The assets of a run folder: text tokenizer, image tokenizer and the two encoders, and the
checks on images given to them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unif2ace.data.text_tokenizer import TextTokenizer
from unif2ace.encoders.cnn import load_encoder, to_tensor
from unif2ace.vq.model import VQAutoencoder


def require(path: Path, what: str) -> Path:
    """``path``, or a FileNotFoundError saying which step of the run folder makes it."""
    if not path.exists():
        root = path.parent if path.parent.name != "encoders" else path.parent.parent
        raise FileNotFoundError(
            f"{what} not found at {path} (run `unif2ace data-all --out {root}` first)"
        )
    return path


def check_images(images, size: int) -> np.ndarray:
    """PIL images or ``uint8 [N, H, W, 3]`` / ``[H, W, 3]`` arrays → ``uint8 [N, size, size, 3]``.
    Wrong mode, dtype or size raises a ValueError saying what was expected."""
    if isinstance(images, (Image.Image, np.ndarray)) and not (
        isinstance(images, np.ndarray) and images.ndim == 4
    ):
        images = [images]
    out = []
    for i, im in enumerate(images):
        if isinstance(im, Image.Image):
            if im.mode != "RGB":
                raise ValueError(f"image {i}: mode {im.mode}, expected RGB (use .convert('RGB'))")
            im = np.asarray(im)
        im = np.asarray(im)
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            raise ValueError(
                f"image {i}: expected uint8 [H, W, 3], got {im.dtype} {list(im.shape)}"
            )
        if im.shape[:2] != (size, size):
            raise ValueError(
                f"image {i}: {im.shape[1]}x{im.shape[0]} px, the image tokenizer takes "
                f"{size}x{size} (resize it first)"
            )
        out.append(im)
    if not out:
        raise ValueError("no images given")
    return np.stack(out)


class Assets:
    """Text tokenizer, image tokenizer and encoders of a run folder (loaded once)."""

    def __init__(self, root):
        self.root = Path(root)
        self.tokenizer = TextTokenizer.from_file(
            require(self.root / "text_tokenizer" / "tokenizer.json", "text tokenizer")
        )
        self.vq = VQAutoencoder.from_pretrained(require(self.root / "vq", "image tokenizer"))
        self.semantic = load_encoder(
            require(self.root / "encoders" / "semantic", "semantic encoder")
        )
        self.identity = load_encoder(
            require(self.root / "encoders" / "identity", "identity encoder")
        )

    @property
    def image_size(self) -> int:
        return self.vq.config.size

    def model_fields(self) -> dict:
        """The model config fields these assets fix."""
        return {
            "text_vocab": self.tokenizer.vocab_size,
            "codebook_size": self.vq.config.codebook_size,
            "image_tokens": self.vq.config.tokens_side**2,
            "semantic_dim": self.semantic.config["dim"],
            "identity_dim": self.identity.config["dim"],
        }

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for p in (
            "text_tokenizer/tokenizer.json",
            "vq/model.safetensors",
            "encoders/semantic/model.safetensors",
            "encoders/identity/model.safetensors",
        ):
            st = (self.root / p).stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def encode_images(self, images, batch: int = 256) -> tuple[torch.Tensor, ...]:
        """uint8 images → (codes int64 [N, h·w], semantic [N, Ds], identity [N, Di])."""
        images = check_images(images, self.image_size)
        codes, sem, ide = [], [], []
        for i in range(0, len(images), batch):
            x = to_tensor(images[i : i + batch])
            codes.append(self.vq.encode(x).flatten(1))
            sem.append(self.semantic.embed(x))
            ide.append(self.identity.embed(x))
        return torch.cat(codes), torch.cat(sem), torch.cat(ide)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor, batch: int = 256) -> np.ndarray:
        """codes ``[N, h·w]`` → ``uint8 [N, H, W, 3]``."""
        out = []
        for i in range(0, len(codes), batch):
            r = self.vq.decode(codes[i : i + batch].cpu())
            out.append(((r + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
        return torch.cat(out).numpy()
