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

Here: :class:`Pipeline`; :func:`check_run_folder`, which names the first missing piece of a run
folder and the command that makes it; :func:`check_resume`, which refuses to resume a training
with another recipe.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from unif2ace.models import UniF2ace
from unif2ace.models.layout import CAPTION_NO_REPEAT_NGRAM, CAPTION_PROMPT
from unif2ace.models.sampling import generate_images, generate_text
from unif2ace.pipeline.assets import (
    FINISHED,
    Assets,
    check_images,
    check_model_assets,
    require,
)
from unif2ace.pipeline.model_data import SplitData, UnifiedDataset, prepare_split
from unif2ace.pipeline.recipe import read_recipe, train_config, train_unified
from unif2ace.train.checkpoint import list_checkpoints

__all__ = [
    "Assets",
    "Pipeline",
    "SplitData",
    "UnifiedDataset",
    "check_images",
    "check_resume",
    "check_run_folder",
    "prepare_split",
    "read_recipe",
    "require",
    "train_unified",
]

# what `unif2ace data-all` leaves in a run folder, in the order it makes them: (what, file written
# last in that step's folder)
RUN_ASSETS = FINISHED
# what each use of a run folder reads: the model's inputs (Assets), its training data, the judge
NEEDS = {
    "assets": ("text tokenizer", "semantic encoder", "identity encoder", "image tokenizer"),
    "data": ("SynthFace data",),
    "judge": ("attribute judge",),
}


def check_run_folder(root, *, need=("assets",), model_dir=None) -> Path:
    """``root`` as a Path when it holds what ``need`` names (keys of :data:`NEEDS`) and, with
    ``model_dir``, a trained model there; else a FileNotFoundError naming the first missing piece
    and the command that makes it (``data-all`` for the assets, ``train`` for the model)."""
    root = Path(root)
    if not root.is_dir():
        what = "a file, not a run folder" if root.exists() else "no run folder there"
        raise FileNotFoundError(f"{root}: {what}; make one with `unif2ace data-all --out {root}`")
    wanted = {w for key in need for w in NEEDS[key]}
    for what, rel in RUN_ASSETS:
        if what in wanted and not (root / rel).is_file():
            raise FileNotFoundError(
                f"{root} has no {what} ({rel} is missing); make the run folder's assets with "
                f"`unif2ace data-all --out {root}`"
            )
    if model_dir is not None:
        model_dir = Path(model_dir)
        if not (model_dir / "model.safetensors").is_file():
            cmd = f"unif2ace train --out {root}"
            if model_dir != root / "model":
                cmd += f" --model-dir {model_dir}"
            ckpts = list_checkpoints(model_dir / "train")
            if ckpts:
                raise FileNotFoundError(
                    f"the training in {model_dir} has not finished (last checkpoint: step "
                    f"{ckpts[-1][0]}); rerun `{cmd}` to resume it"
                )
            raise FileNotFoundError(f"no trained model in {model_dir}; train one with `{cmd}`")
    return root


# TrainConfig fields that change what a resumed run computes: another value is refused (the model
# config is checked by the trainer). Left free: the step count (checked apart), checkpoint and log
# cadence, progress, amp, device, parallelism, compile and grad_accum (how a step is computed, not
# which).
RESUME_FIXED = (
    "batch_size",
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "weight_decay",
    "betas",
    "eps",
    "clip_grad_norm",
    "seed",
)


def check_resume(recipe: dict, model_dir) -> list[str]:
    """Refuse (ValueError) to resume the training in ``model_dir`` with a recipe whose train
    section differs from the one the run was started with in a :data:`RESUME_FIXED` field, or
    asks for fewer steps than the run has done. Returns notes to show the user (another step
    count: the schedule now ends elsewhere). Nothing to check when no checkpoint exists."""
    model_dir = Path(model_dir)
    ckpts = list_checkpoints(model_dir / "train")
    if not ckpts:
        return []
    done, newest = ckpts[-1]
    saved = json.loads((newest / "train_config.json").read_text())
    tsec = dict(recipe.get("train") or {})
    budget = tsec.pop("max_minutes", None)
    asked = train_config(tsec, model_dir / "train").to_dict()
    retry = "pass the same value, or train into another folder (--model-dir)"
    for key in RESUME_FIXED:
        old, new = json.loads(json.dumps(saved.get(key))), json.loads(json.dumps(asked[key]))
        if key in saved and old != new:
            raise ValueError(
                f"{model_dir} was trained with train.{key}={old}, not train.{key}={new}: "
                f"resuming with another value would mix two recipes; {retry}"
            )
    steps_file = model_dir / "train" / "steps.json"
    if budget is not None:  # the step count comes from the time budget, fixed at the first run
        if not steps_file.is_file():
            return []
        steps = json.loads(steps_file.read_text())["steps"]
    else:
        steps = asked["steps"]
    if steps < done:
        raise ValueError(
            f"{model_dir} is at step {done}, past train.steps={steps}: there is nothing to train "
            "and a finished run cannot be shortened; train into another folder (--model-dir)"
        )
    if steps != saved.get("steps", steps):
        return [
            f"the run in {model_dir} was started for {saved['steps']} steps and now goes to "
            f"{steps}: its learning-rate schedule now ends at step {steps}"
        ]
    return []


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
        model_dir = Path(model_dir or root / "model")
        check_run_folder(root, model_dir=model_dir)
        assets = Assets(root)
        check_model_assets(model_dir, assets)  # the tokenizers and encoders it was trained with
        return cls(UniF2ace.from_pretrained(model_dir), assets)

    @property
    def image_size(self) -> int:
        """The side of the images the run's tokenizer takes."""
        return self.assets.image_size

    def _tokens(self, texts: list[str], what: str) -> list[list[int]]:
        out = []
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"{what} {i} is empty")
            out.append(self.assets.tokenizer.encode(t))
        return out

    def generate(
        self, prompts: str | list[str], *, seed: int = 0, batch: int = 32, **sampling
    ) -> np.ndarray:
        """Faces ``uint8 [N, H, W, 3]`` for text prompts (a string is one prompt), ``batch`` at a
        time (the batch from prompt ``i`` on with seed ``seed + i``). ``sampling``: ``steps``,
        ``guidance``, ``temperature``, ``choice_temperature`` and ``image_logits`` (e.g.
        ``self.model.compile_image_logits()``) of
        :func:`~unif2ace.models.sampling.generate_images` (its defaults where left out)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompt given: pass a prompt or a list of prompts")
        toks = self._tokens(prompts, "prompt")
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
