"""From files to a trained model and back: the assets of a run folder, the model's training data,
the training recipe, and :class:`Pipeline` (text → faces, image + question → answer, image →
caption).

A run folder is what ``unif2ace data-all --out RUN`` writes (``RUN/synthface``,
``RUN/text_tokenizer``, ``RUN/vq``, ``RUN/encoders``, ``RUN/judge``) plus, after training,
``RUN/model``. The modules:

- :mod:`unif2ace.pipeline.assets` — :class:`Assets` (tokenizers and encoders of a run folder),
  :func:`check_images`
- :mod:`unif2ace.pipeline.model_data` — :class:`SplitData` / :func:`prepare_split` (the model's
  inputs per image, cached in ``RUN/model_data/{split}.pt``) and :class:`UnifiedDataset`
- :mod:`unif2ace.pipeline.recipe` — :func:`read_recipe` / :func:`train_unified` (``unif2ace train``)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from unif2ace.models import UniF2ace
from unif2ace.models.layout import CAPTION_NO_REPEAT_NGRAM, CAPTION_PROMPT
from unif2ace.models.sampling import generate_images, generate_text
from unif2ace.pipeline.assets import Assets, check_images, require
from unif2ace.pipeline.model_data import SplitData, UnifiedDataset, prepare_split
from unif2ace.pipeline.recipe import read_recipe, train_unified

__all__ = [
    "Assets",
    "Pipeline",
    "SplitData",
    "UnifiedDataset",
    "check_images",
    "prepare_split",
    "read_recipe",
    "require",
    "train_unified",
]


class Pipeline:
    """A trained model with its tokenizers and encoders: text → faces, image + question → answer,
    image → caption. ``Pipeline.load(RUN)`` reads ``RUN/model`` and the run's assets."""

    def __init__(self, model, assets: Assets):
        self.model, self.assets = model.eval(), assets
        if model.config.image_tokens != assets.vq.config.tokens_side**2:
            raise ValueError("the model and the image tokenizer disagree on tokens per image")

    @classmethod
    def load(cls, root, model_dir=None) -> Pipeline:
        root = Path(root)
        model = UniF2ace.from_pretrained(
            require(Path(model_dir or root / "model"), "trained model")
        )
        return cls(model, Assets(root))

    def _tokens(self, texts: list[str], what: str) -> list[list[int]]:
        out = []
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"{what} {i} is empty")
            out.append(self.assets.tokenizer.encode(t))
        return out

    def generate(
        self, prompts: list[str], *, seed: int = 0, batch: int = 32, **sampling
    ) -> np.ndarray:
        """Faces ``uint8 [N, H, W, 3]`` for text prompts, ``batch`` at a time (the batch from
        prompt ``i`` on with seed ``seed + i``). ``sampling``: ``steps``, ``guidance``, ``temperature``,
        ``choice_temperature`` of :func:`~unif2ace.models.sampling.generate_images` (its defaults
        where left out)."""
        toks = self._tokens(list(prompts), "prompt")
        codes = [
            generate_images(self.model, toks[i : i + batch], seed=seed + i, **sampling)
            for i in range(0, len(toks), batch)
        ]
        return self.assets.decode_codes(torch.cat(codes))

    def answer(
        self,
        images,
        questions: list[str],
        *,
        max_new_tokens: int = 16,
        batch: int = 32,
        no_repeat_ngram: int = 0,
    ) -> list[str]:
        """Answers to one question per image."""
        if images is None:
            raise ValueError("a question needs an image")
        images = check_images(images, self.assets.image_size)
        questions = [questions] if isinstance(questions, str) else list(questions)
        if len(questions) != len(images):
            raise ValueError(f"{len(questions)} questions for {len(images)} images")
        toks = self._tokens(questions, "question")
        out = []
        for i in range(0, len(images), batch):
            codes, sem, ide = self.assets.encode_images(images[i : i + batch])
            ans = generate_text(
                self.model,
                codes,
                toks[i : i + batch],
                semantic=sem,
                identity=ide,
                max_new_tokens=max_new_tokens,
                no_repeat_ngram=no_repeat_ngram,
            )
            out += [self.assets.tokenizer.decode(a).strip() for a in ans]
        return out

    def caption(
        self,
        images,
        *,
        max_new_tokens: int | None = None,
        batch: int = 32,
        no_repeat_ngram: int = CAPTION_NO_REPEAT_NGRAM,
    ) -> list[str]:
        """A fine-grained caption per image (greedy, no repeated ``no_repeat_ngram``-grams)."""
        images = check_images(images, self.assets.image_size)
        return self.answer(
            images,
            [CAPTION_PROMPT] * len(images),
            max_new_tokens=max_new_tokens or self.model.config.max_text_len,
            batch=batch,
            no_repeat_ngram=no_repeat_ngram,
        )
