"""The CLIP vision tower of Show-o's CLIP-ViT variants, from a local transformers folder.

Show-o reads ``openai/clip-vit-large-patch14-336`` (a ``CLIPVisionModel``): the image is prepared
by the folder's ``CLIPImageProcessor`` (short side to 336, bicubic; centre crop; CLIP's mean and
std), and the features are the second-to-last layer's hidden states without the CLS token: 576
patch features of width 1024, which the checkpoint's ``mm_projector`` maps into the model.
"""

from __future__ import annotations

from pathlib import Path

import torch


class ClipTower:
    """``CLIPVisionModel`` + ``CLIPImageProcessor`` loaded from ``folder`` (no download)."""

    def __init__(self, folder, dtype: torch.dtype | None = None, device="cpu"):
        import transformers

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder / 'config.json'} not found (expected a local copy of a CLIP vision "
                "tower, e.g. openai/clip-vit-large-patch14-336)"
            )
        self.model = (
            transformers.CLIPVisionModel.from_pretrained(
                folder, local_files_only=True, torch_dtype=dtype
            )
            .to(device)
            .eval()
        )
        if (folder / "preprocessor_config.json").is_file():
            self.processor = transformers.CLIPImageProcessor.from_pretrained(
                folder, local_files_only=True
            )
        else:  # CLIP's own settings at the tower's resolution
            size = self.model.config.image_size
            self.processor = transformers.CLIPImageProcessor(
                size={"shortest_edge": size}, crop_size={"height": size, "width": size}
            )
        self.hidden_size = self.model.config.hidden_size

    @torch.no_grad()
    def features(self, image) -> torch.Tensor:
        """``[1, patches, hidden]``: the second-to-last layer without CLS, for a PIL image."""
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
        p = next(self.model.parameters())
        out = self.model(pixels.to(p.device, p.dtype), output_hidden_states=True)
        return out.hidden_states[-2][:, 1:]
