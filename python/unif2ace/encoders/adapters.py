"""Adapters that load real encoders from local files, with the same ``embed`` interface as the
SynthFace stand-ins (images in, L2-normalised ``float32 [B, D]`` out). Nothing is downloaded.

- :class:`ClipVisionAdapter` — a CLIP vision tower saved with ``transformers``
  (``CLIPVisionModelWithProjection``; a full ``CLIPModel`` folder works too). Preprocessing follows
  the folder's ``preprocessor_config.json`` when there is one (size, mean, std), done in torch so
  that no torchvision is needed: bicubic resize of the whole (already face-centred) image.
- :class:`OnnxFaceAdapter` — a face-recognition ONNX model run with ``onnxruntime`` (e.g.
  AntelopeV2's ``glintr100.onnx`` / buffalo's ``w600k_r50.onnx``: RGB, 112×112,
  ``(x − 127.5) / 127.5``, NCHW). Input size is read from the model; faces are expected centred
  and roughly aligned, as SynthFace and FFHQ-style crops are.

Inputs: ``uint8 [N, H, W, 3]`` arrays, or ``float [N, 3, H, W]`` tensors in [-1, 1].
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_unit(images) -> torch.Tensor:
    """-> float [N, 3, H, W] in [0, 1]."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    if x.dtype == torch.uint8:
        return x.permute(0, 3, 1, 2).float() / 255.0
    return (x.float() + 1) / 2


class ClipVisionAdapter:
    def __init__(self, path, device: str = "cpu"):
        from transformers import CLIPVisionModelWithProjection  # optional and heavy

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"CLIP model folder not found: {path}")
        self.model = CLIPVisionModelWithProjection.from_pretrained(str(path)).to(device).eval()
        vc = self.model.config
        size, mean, std = vc.image_size, _CLIP_MEAN, _CLIP_STD
        pp = path / "preprocessor_config.json"
        if pp.is_file():
            cfg = json.loads(pp.read_text())
            s = cfg.get("crop_size") or cfg.get("size") or size
            size = s.get("height", s.get("shortest_edge", size)) if isinstance(s, dict) else s
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        self.size, self.device = int(size), device
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.dim = self.model.config.projection_dim

    @torch.no_grad()
    def embed(self, images, batch: int = 64) -> torch.Tensor:
        x = _to_unit(images)
        outs = []
        for i in range(0, len(x), batch):
            xb = F.interpolate(
                x[i : i + batch],
                size=(self.size, self.size),
                mode="bicubic",
                align_corners=False,
                antialias=True,
            ).clamp(0, 1)
            xb = ((xb - self.mean) / self.std).to(self.device)
            outs.append(self.model(pixel_values=xb).image_embeds.float().cpu())
        return F.normalize(torch.cat(outs), dim=-1)


class OnnxFaceAdapter:
    def __init__(
        self, path, providers=("CPUExecutionProvider",), mean: float = 127.5, std: float = 127.5
    ):
        import onnxruntime as ort  # optional: only this adapter needs it

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX face model not found: {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, torch.get_num_threads())
        self.session = ort.InferenceSession(str(path), opts, providers=list(providers))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = inp.shape  # [N, 3, H, W] with N possibly symbolic
        if len(shape) != 4 or shape[1] != 3:
            raise ValueError(f"{path}: expected an NCHW RGB input, got shape {shape}")
        self.size = (
            int(shape[2]) if isinstance(shape[2], int) else 112,
            int(shape[3]) if isinstance(shape[3], int) else 112,
        )
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.mean, self.std = mean, std
        self.dim = self.session.get_outputs()[0].shape[-1]

    def embed(self, images, batch: int = 64) -> torch.Tensor:
        x = _to_unit(images) * 255.0
        x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        x = ((x - self.mean) / self.std).numpy().astype(np.float32)
        step = self.fixed_batch or batch
        outs = []
        for i in range(0, len(x), step):
            xb = x[i : i + step]
            n = len(xb)
            if self.fixed_batch and n < step:  # pad a fixed-batch model's last batch
                xb = np.concatenate([xb, np.zeros((step - n, *xb.shape[1:]), np.float32)])
            outs.append(self.session.run(None, {self.input_name: xb})[0][:n])
        return F.normalize(torch.from_numpy(np.concatenate(outs)).float(), dim=-1)
