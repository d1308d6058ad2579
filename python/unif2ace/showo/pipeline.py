"""Show-o from the folders a researcher downloads, as ``generate`` and ``answer``.

* ``showo``: a Show-o checkpoint folder (``showlab/show-o``, ``show-o-512x512``,
  ``show-o-w-clip-vit``, ``show-o-w-clip-vit-512x512``);
* ``magvit``: MAGVIT-v2 (``showlab/magvitv2``), which turns images into codes and back;
* ``tokenizer``: Phi-1.5's tokenizer folder (``microsoft/phi-1_5``, its ``tokenizer.json``);
* ``clip``: for the CLIP-ViT variants, ``openai/clip-vit-large-patch14-336``.

The image size follows the checkpoint: ``num_vq_tokens`` 256 is 16×16 codes (256 px), 1024 is
32×32 (512 px).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from unif2ace.showo.checkpoint import load_showo
from unif2ace.showo.clip import ClipTower
from unif2ace.showo.generate import mmu_answer, mmu_answer_clip, t2i_generate
from unif2ace.showo.vocab import SYSTEM_PROMPT, PhiTokenizer
from unif2ace.vq.magvitv2 import load_magvitv2, postprocess, preprocess_image


class ShowoPipeline:
    def __init__(self, model, tokenizer: PhiTokenizer, magvit=None, clip: ClipTower | None = None):
        self.model, self.tokenizer, self.magvit, self.clip = model, tokenizer, magvit, clip
        self.vocab = model.showo
        side = math.isqrt(self.vocab.num_vq_tokens)
        if side * side != self.vocab.num_vq_tokens:
            raise ValueError(f"num_vq_tokens {self.vocab.num_vq_tokens} is not a square grid")
        self.grid = side
        self.size = side * 16  # MAGVIT-v2 downsamples by 16

    @classmethod
    def from_folders(
        cls,
        showo,
        tokenizer,
        magvit=None,
        clip=None,
        *,
        dtype: torch.dtype | None = None,
        device="cpu",
    ) -> ShowoPipeline:
        """Load every part from local folders (nothing is downloaded). ``magvit`` is needed to
        generate and, for the VQ variants, to answer; ``clip`` to answer with a CLIP-ViT
        variant."""
        model = load_showo(showo, dtype=dtype, device=device)
        tok = PhiTokenizer(tokenizer, model.showo)
        vq = load_magvitv2(magvit, device=device) if magvit is not None else None
        tower = ClipTower(clip, device=device) if clip is not None else None
        if tower is not None:
            if not model.config.mm_projector_dim:
                raise ValueError(f"{showo}: not a CLIP-ViT variant (w_clip_vit is false)")
            if tower.hidden_size != model.config.mm_projector_dim:
                raise ValueError(
                    f"{clip}: the CLIP tower's hidden size {tower.hidden_size} does not match the "
                    f"checkpoint's mm_projector input {model.config.mm_projector_dim}"
                )
        return cls(model, tok, vq, tower)

    def _need_magvit(self, what: str):
        if self.magvit is None:
            raise ValueError(f"{what} needs MAGVIT-v2: pass its folder (--magvit)")
        return self.magvit

    def generate(
        self,
        prompts: str | list[str],
        *,
        steps: int = 18,
        guidance: float = 5.0,
        seed: int = 0,
        annealing: str = "showo",
    ) -> torch.Tensor:
        """Images ``uint8 [B, size, size, 3]`` for text prompts (a string is one prompt)."""
        vq = self._need_magvit("generate")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("generate: no prompts")
        ids = [self.tokenizer.encode(p) for p in prompts]
        codes = t2i_generate(
            self.model, ids, steps=steps, guidance=guidance, seed=seed, annealing=annealing
        )
        with torch.no_grad():
            images = vq.decode_code(codes.to(next(vq.parameters()).device))
        return postprocess(images)

    def encode_image(self, image) -> torch.Tensor:
        """An image (PIL image or path) as MAGVIT-v2 codes ``[N]``."""
        vq = self._need_magvit("answer (VQ variant)")
        x = preprocess_image(_open(image), self.size)
        with torch.no_grad():
            return vq.get_code(x.to(next(vq.parameters()).device))[0]

    def answer(self, image, question: str, *, max_new_tokens: int = 100) -> str:
        """The greedy answer to ``question`` about ``image`` (PIL image or path)."""
        if self.model.config.mm_projector_dim:
            if self.clip is None:
                raise ValueError(
                    "this is a CLIP-ViT variant: pass the CLIP tower's folder (--clip)"
                )
            feats = self.clip.features(_open(image))
            system = self.tokenizer.encode(SYSTEM_PROMPT)
            q = self.tokenizer.encode(f"USER: {question} ASSISTANT:")
            out = mmu_answer_clip(self.model, feats, system, q, max_new_tokens=max_new_tokens)
        else:
            codes = self.encode_image(image)
            q = self.tokenizer.encode("USER: \n" + question + " ASSISTANT:")
            out = mmu_answer(self.model, codes, q, max_new_tokens=max_new_tokens)
        return self.tokenizer.decode(out).strip()


def _open(image):
    from PIL import Image

    if isinstance(image, (str, Path)):
        path = Path(image)
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable image ({e})") from None
    return image.convert("RGB")
