"""The assets of a run folder: text tokenizer, image tokenizer and the two encoders, and the
checks on images given to them; their content hashes, and the binding of a trained model to the
assets it was trained with.

A model folder holds ``assets.json``: the sha256 of each asset (and of the SynthFace records) it
was trained with, written when its training starts. A resumed training, and a model loaded for
inference (:func:`check_model_assets`), refuse assets whose bytes differ, naming them: a model
run against a tokenizer it never saw gives wrong results without any error.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unif2ace.data.text_tokenizer import TextTokenizer
from unif2ace.encoders.cnn import load_encoder, to_tensor
from unif2ace.io import atomic_write_json, sha256_file
from unif2ace.vq.model import VQAutoencoder

# the files whose bytes make each asset a model depends on (relative to the run folder)
MODEL_ASSETS = {
    "text tokenizer": ("text_tokenizer/tokenizer.json",),
    "image tokenizer": ("vq/config.json", "vq/model.safetensors"),
    "semantic encoder": ("encoders/semantic/config.json", "encoders/semantic/model.safetensors"),
    "identity encoder": ("encoders/identity/config.json", "encoders/identity/model.safetensors"),
}
DATASET = "SynthFace data"  # hashed as its meta.json and the record files it lists (not images)
# what data-all leaves finished in a run folder: (what, the file its step writes last)
FINISHED = (
    (DATASET, "synthface/meta.json"),
    ("text tokenizer", "text_tokenizer/tokenizer.json"),
    ("attribute judge", "judge/model.safetensors"),
    ("semantic encoder", "encoders/semantic/model.safetensors"),
    ("identity encoder", "encoders/identity/model.safetensors"),
    ("image tokenizer", "vq/model.safetensors"),
)
BINDING = "assets.json"


class AssetMismatch(ValueError):
    """A model and the assets it is used with are not the ones it was trained with."""


def _dataset_files(root: Path) -> list[str]:
    meta = root / "synthface" / "meta.json"
    try:
        listed = json.loads(meta.read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        listed = []
    return ["synthface/meta.json", *(f"synthface/{n}" for n in sorted(listed))]


def asset_hashes(root, *, dataset: bool = True) -> dict[str, str]:
    """``{asset: sha256}`` of the run folder's model assets (:data:`MODEL_ASSETS`) and, with
    ``dataset``, of its SynthFace records; an asset with a file missing is left out."""
    root = Path(root)
    groups = dict(MODEL_ASSETS)
    if dataset:
        groups[DATASET] = tuple(_dataset_files(root))
    out = {}
    for name, files in groups.items():
        if all((root / f).is_file() for f in files):
            h = hashlib.sha256()
            for f in files:
                h.update(f"{f}\0{sha256_file(root / f)}\0".encode())
            out[name] = h.hexdigest()
    return out


def finished_assets(root) -> list[str]:
    """The assets of :data:`FINISHED` that the run folder already holds, in data-all's order."""
    return [what for what, rel in FINISHED if (Path(root) / rel).is_file()]


def trained_models(root) -> list[Path]:
    """Model folders directly in the run folder (``model/``, ``ablations/N/``) that hold weights
    or training checkpoints."""
    root = Path(root)
    found = []
    for d in [root / "model", *sorted((root / "ablations").glob("*"))]:
        if (d / "model.safetensors").is_file() or (d / "train" / "checkpoints").is_dir():
            found.append(d)
    return found


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

    def hashes(self, dataset: bool = True) -> dict[str, str]:
        """:func:`asset_hashes` of this run folder (read now: files may change after loading)."""
        return asset_hashes(self.root, dataset=dataset)

    def fingerprint(self) -> str:
        """One hash of the assets' and the dataset records' bytes (keys the model-data cache)."""
        return hashlib.sha256(json.dumps(self.hashes(), sort_keys=True).encode()).hexdigest()[:16]

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


def bind_model(model_dir, assets: Assets) -> None:
    """Record in ``model_dir/assets.json`` the hashes of the assets the model is trained with."""
    atomic_write_json(Path(model_dir) / BINDING, {"sha256": assets.hashes()})


def check_model_assets(model_dir, assets: Assets, *, training: bool = False) -> None:
    """Refuse (:class:`AssetMismatch`, naming every asset that differs) a model whose
    ``assets.json`` records other bytes than ``assets`` holds now. The dataset counts only for
    ``training`` (resuming on other data); inference needs only the tokenizers and encoders. A
    model folder without ``assets.json`` (trained before it existed) is not checked."""
    model_dir = Path(model_dir)
    try:
        bound = json.loads((model_dir / BINDING).read_text())["sha256"]
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AssetMismatch(f"{model_dir / BINDING} does not read ({e})") from None
    now = assets.hashes(dataset=training)
    differ = [
        n for n in [*MODEL_ASSETS, *([DATASET] if training else [])] if bound.get(n) != now.get(n)
    ]
    if differ:
        redo = (
            "train into another folder (--model-dir)"
            if training
            else f"retrain it (`unif2ace train --out {assets.root} --model-dir NEW`)"
        )
        raise AssetMismatch(
            f"{model_dir} was trained with another {', '.join(differ)} than "
            f"{assets.root} holds now ({model_dir / BINDING} records their sha256); {redo}, "
            "or restore the assets it was trained with"
        )
