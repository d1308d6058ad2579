"""UniF²ace fine-tuned from the released Show-o, as the paper trains it: the run folder behind
``unif2ace init --from-showo``, ``tokenize-images``, ``train``, ``generate`` / ``answer`` /
``caption`` / ``evaluate`` on such a run.

A run folder::

    run.json              what the run starts from: the Show-o, MAGVIT-v2, Phi tokenizer, CLIP and
                          face-ONNX paths, the parameter count (``init`` writes it)
    recipe.yaml           the recipe it was initialised with (model / train / data sections)
    init/                 the upcycled model (:func:`unif2ace.showo.upcycle.upcycle_showo`)
    features/<split>/     the image features (:mod:`unif2ace.pipeline.features`)
    model/                the fine-tuned model; model/train/ its checkpoints and log

Training reads the feature cache and the dataset's texts, never the images; it starts each rank
from ``init/`` through the trainer's sharded start (``TrainConfig.init_from``: the model is built
on the meta device and each rank loads its own shards), so no rank holds a full fp32 copy under
FSDP2. The text side follows Show-o: a caption is the t2i prompt; an MMU question is
``"USER: \\n" + question + " ASSISTANT:"`` and its answer ``" " + answer``, tokenised by
Phi-1.5's tokenizer; captioning is the question :data:`CAPTION_QUESTION`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from unif2ace.data.unif2aced import UniF2aceData
from unif2ace.io import atomic_write_bytes, atomic_write_json, lock_folder
from unif2ace.models import ModelConfig, UniF2ace, collate, get_config, parameter_count
from unif2ace.models.layout import TASK_MMU, TASK_T2I, Example
from unif2ace.models.sampling import generate_images, generate_text
from unif2ace.pipeline.features import FeatureCache, check_face_input
from unif2ace.pipeline.recipe import DATA_DEFAULTS, train_and_save, train_config
from unif2ace.showo.checkpoint import open_showo
from unif2ace.showo.upcycle import showo_fixed, upcycle_showo
from unif2ace.showo.vocab import PhiTokenizer

KIND = "unif2ace-from-showo"
RUN_FILE = "run.json"
PAPER_PARAMS = 1.8e9  # "1.8B" (the paper's Tables 1-2)
CAPTION_QUESTION = "Describe this face in detail."


def is_paper_run(root) -> bool:
    """Whether ``root`` is a run folder made by :func:`init_run`."""
    path = Path(root) / RUN_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("kind") == KIND
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_run(root) -> dict:
    path = Path(root) / RUN_FILE
    if not is_paper_run(root):
        raise FileNotFoundError(
            f"{path} not found or not a {KIND} run (make one with `unif2ace init --from-showo`)"
        )
    return json.loads(path.read_text())


def _encoder_dims(clip, face_onnx) -> dict:
    """The embedding sizes the sequence MoE takes, read from the encoders (their absence: the
    config's, and those experts get zeros)."""
    out = {}
    if clip is not None:
        cpath = Path(clip) / "config.json"
        if not cpath.is_file():
            raise FileNotFoundError(f"{cpath} not found (expected a CLIP model folder)")
        conf = json.loads(cpath.read_text())
        dim = conf.get("projection_dim") or conf.get("vision_config", {}).get("projection_dim")
        if not isinstance(dim, int):
            raise ValueError(f"{cpath}: no projection_dim (not a CLIP model with projection)")
        out["semantic_dim"] = dim
    if face_onnx is not None:
        from unif2ace.encoders.adapters import OnnxFaceAdapter

        face = OnnxFaceAdapter(face_onnx)
        check_face_input(face, str(face_onnx))
        if not isinstance(face.dim, int):
            raise ValueError(f"{face_onnx}: the output size is not fixed ({face.dim!r})")
        out["identity_dim"] = face.dim
    return out


def paper_model_config(section: dict, showo_cfg: ModelConfig, dims: dict) -> ModelConfig:
    """The recipe's model section on top of its preset (default "paper"), with what the Show-o
    checkpoint (vocabulary, sizes, layout, MLP width) and the encoders (embedding sizes) fix."""
    section = dict(section)
    preset = section.pop("preset", "paper")
    return get_config(preset, **{**section, **showo_fixed(showo_cfg), **dims})


def init_run(
    out,
    *,
    showo,
    magvit,
    tokenizer,
    recipe: dict,
    clip=None,
    face_onnx=None,
    recipe_text: str | None = None,
    seed: int = 0,
) -> dict:
    """Write a run folder (see the module docstring) from the released checkpoints: the model of
    ``recipe["model"]`` upcycled from ``showo``, with the paths of the other parts. Everything is
    checked before anything is written. Returns the parameter count next to the paper's."""
    out = Path(out)
    paths = {"showo": showo, "magvit": magvit, "tokenizer": tokenizer}
    paths.update({"clip": clip, "face_onnx": face_onnx})
    for name, p in paths.items():
        if p is not None and not Path(p).exists():
            raise FileNotFoundError(f"--{name.replace('_', '-')}: {p} does not exist")
    _, _, showo_cfg, _ = open_showo(showo)  # checks the whole checkpoint's names and shapes
    if showo_cfg.mm_projector_dim:
        raise ValueError(
            f"{showo}: a CLIP-ViT variant of Show-o; UniF²ace starts from a VQ Show-o "
            "(showlab/show-o or show-o-512x512)"
        )
    from unif2ace.vq.magvitv2 import load_magvitv2

    load_magvitv2(magvit)  # a broken MAGVIT folder is named now, not at tokenize-images
    PhiTokenizer(tokenizer)
    cfg = paper_model_config(recipe.get("model", {}), showo_cfg, _encoder_dims(clip, face_onnx))
    train_config({k: v for k, v in recipe.get("train", {}).items() if k != "max_minutes"}, out)
    if (out / "model" / "train").is_dir() and any((out / "model" / "train").iterdir()):
        raise ValueError(f"{out} already holds a training run (model/train); use another --out")
    with lock_folder(out, "init"):
        model = upcycle_showo(showo, cfg, seed=seed)
        model.save_pretrained(out / "init")
        counts = parameter_count(cfg)
        run = {
            "kind": KIND,
            **{k: None if v is None else str(Path(v).resolve()) for k, v in paths.items()},
            "seed": seed,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "parameters": counts["total"],
            "active_parameters": counts["active_per_token"],
        }
        text = recipe_text or json.dumps(recipe, indent=1)
        atomic_write_bytes(out / "recipe.yaml", text.encode())
        atomic_write_json(out / RUN_FILE, run)
    return {
        "run": str(out),
        "config": cfg.name,
        "parameters": counts["total"],
        "active_parameters_per_token": counts["active_per_token"],
        "paper_parameters": PAPER_PARAMS,
        "note": (
            f"{counts['total'] / 1e9:.2f} B parameters, {counts['active_per_token'] / 1e9:.2f} B "
            "active per token; the paper gives ~1.8 B (Show-o counts 1.45 B here, 1.3 B there)"
        ),
    }


# ---------------------------------------------------------------------------------------------
# training data


def _qa(tok, question: str, answer: str | None, first: bool):
    q = tok.encode(("USER: \n" if first else " USER: ") + question + " ASSISTANT:")
    return q, (None if answer is None else tok.encode(" " + answer))


class PaperDataset(torch.utils.data.Dataset):
    """Training items of one split from the feature cache and the dataset's texts: per image
    ``t2i_per_image`` text → image rows (its caption as prompt), a captioning row, and its VQA
    conversations, ``vqa_turns`` turns to a row. Items are :class:`Example` in layout "showo"."""

    def __init__(self, data: UniF2aceData, feats: FeatureCache, tok, data_conf: dict):
        conf = {**DATA_DEFAULTS, **data_conf}
        tasks = tuple(conf["tasks"])
        if not tasks or set(tasks) - {"t2i", "caption", "vqa"}:
            raise ValueError(f"data.tasks must be a subset of t2i, caption, vqa; got {tasks}")
        self.feats, self.tok = feats, tok
        self.captions = [tok.encode(c) if c else [] for c in data.captions]
        self.items: list[tuple[int, int, list]] = []
        for i, cap in enumerate(self.captions):
            if cap and "t2i" in tasks:
                self.items += [(TASK_T2I, i, [])] * int(conf["t2i_per_image"])
            if cap and "caption" in tasks:
                self.items.append((TASK_MMU, i, [(CAPTION_QUESTION, data.captions[i])]))
        if "vqa" in tasks:
            per_image: dict[int, list] = {}
            for i, turns in data.vqa:
                per_image.setdefault(i, []).extend(turns)
            n, k = conf["vqa_per_image"], int(conf["vqa_turns"])
            for i, turns in per_image.items():
                turns = turns[:n] if n else turns
                self.items += [(TASK_MMU, i, turns[j : j + k]) for j in range(0, len(turns), k)]
        if not self.items:
            raise ValueError(f"{data.root}: no training items (no captions or VQA for {tasks})")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, n: int) -> Example:
        task, i, turns = self.items[n]
        codes = self.feats.codes[i].long()
        sem = None if self.feats.clip is None else self.feats.clip[i]
        ide = None if self.feats.face is None else self.feats.face[i]
        if task == TASK_T2I:
            return Example(TASK_T2I, codes, self.captions[i], index=n)
        (q, a), *more = turns
        q, a = _qa(self.tok, q, a, True)
        rest = tuple(_qa(self.tok, mq, ma, False) for mq, ma in more)
        return Example(TASK_MMU, codes, q, a, sem, ide, index=n, turns=rest)


def _features(root: Path, split: str) -> tuple[FeatureCache, UniF2aceData]:
    feats = FeatureCache(root / "features" / split)
    return feats, feats.check(feats.manifest["dataset_root"])


def _embedding_stats(model, feats: FeatureCache) -> None:
    """The standardisation of the cached embeddings (an encoder left out: zeros, as the model
    then gets)."""
    if (feats.clip is None and feats.face is None) or len(feats) < 2:
        return
    cfg, n = model.config, len(feats)
    sem = feats.clip if feats.clip is not None else torch.zeros(n, cfg.semantic_dim)
    ide = feats.face if feats.face is not None else torch.zeros(n, cfg.identity_dim)
    model.fit_embedding_stats(sem, ide)


def train_paper(
    root, recipe: dict, *, progress: bool = True, stop_after: int | None = None
) -> dict:
    """Fine-tune the run's model on its ``features/train`` cache; resumes from the newest
    checkpoint that verifies. The final model goes to ``root/model``."""
    root = Path(root)
    run = read_run(root)
    feats, data = _features(root, "train")
    cfg = init_config(root)
    _check_features(cfg, feats)
    tok = PhiTokenizer(run["tokenizer"])
    dataset = PaperDataset(data, feats, tok, recipe.get("data", {}))
    out = root / "model"
    tsec = {"progress": progress, **recipe.get("train", {})}
    tsec.pop("max_minutes", None)
    tcfg = train_config({"init_from": str(root / "init"), **tsec}, out / "train")
    with torch.device("meta"):
        model = UniF2ace(cfg)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with lock_folder(root, "train", shared=True) if rank0 else contextlib.nullcontext():
        return train_and_save(
            model,
            dataset,
            cfg,
            tcfg,
            out,
            stop_after=stop_after,
            on_start=functools.partial(_embedding_stats, feats=feats),
        )


def init_config(root) -> ModelConfig:
    """The config of the run's initial model (``init/config.json``)."""
    root = Path(root)
    conf = json.loads((root / "init" / "config.json").read_text())
    conf.pop("model_type", None)
    return ModelConfig.from_dict(conf, where=str(root / "init" / "config.json"))


def _check_features(cfg: ModelConfig, feats: FeatureCache) -> None:
    if feats.tokens_per_image != cfg.image_tokens:
        raise ValueError(
            f"{feats.folder}: {feats.tokens_per_image} codes per image, the model takes "
            f"{cfg.image_tokens} (tokenize the images at the Show-o's resolution)"
        )
    for name, e, dim in (
        ("clip", feats.clip, cfg.semantic_dim),
        ("face", feats.face, cfg.identity_dim),
    ):
        if e is not None and e.shape[1] != dim:
            raise ValueError(
                f"{feats.folder}: {name} embeddings of size {e.shape[1]}, the model takes {dim}"
            )


# ---------------------------------------------------------------------------------------------
# inference and evaluation


class PaperPipeline:
    """A fine-tuned (or just initialised) run: text → images, image + question → answer."""

    def __init__(self, root, model_dir=None):
        self.root = Path(root)
        self.run = read_run(self.root)
        folder = Path(model_dir) if model_dir else self.root / "model"
        if not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"{folder}/model.safetensors not found: train the run first "
                f"(`unif2ace train --out {self.root}`), or pass --model-dir {self.root / 'init'}"
            )
        self.model = UniF2ace.from_pretrained(folder).eval()
        self.cfg = self.model.config
        self.tok = PhiTokenizer(self.run["tokenizer"])
        from unif2ace.vq.magvitv2 import load_magvitv2

        self.magvit = load_magvitv2(self.run["magvit"])
        self.image_size = math.isqrt(self.cfg.image_tokens) * 16  # MAGVIT-v2: 16 px a code
        self._encoders = None

    def generate(self, prompts: list[str], *, steps=18, guidance=5.0, temperature=1.0, seed=0):
        """Images ``uint8 [B, size, size, 3]``."""
        from unif2ace.vq.magvitv2 import postprocess

        ids = [self.tok.encode(p) for p in prompts]
        codes = generate_images(
            self.model, ids, steps=steps, guidance=guidance, temperature=temperature, seed=seed
        )
        with torch.no_grad():
            return postprocess(self.magvit.decode_code(codes)).cpu().numpy()

    def _embed(self, x: torch.Tensor):
        if self._encoders is None:
            from unif2ace.encoders.adapters import ClipVisionAdapter, OnnxFaceAdapter

            clip, face = self.run.get("clip"), self.run.get("face_onnx")
            self._encoders = (
                ClipVisionAdapter(clip) if clip else None,
                OnnxFaceAdapter(face) if face else None,
            )
        clip, face = self._encoders
        return (
            None if clip is None else clip.embed(x),
            None if face is None else face.embed(x),
        )

    def answer(self, images, questions: list[str], max_new_tokens: int = 100) -> list[str]:
        """Greedy answers; ``images``: ``uint8 [N, H, W, 3]`` arrays or PIL images."""
        from PIL import Image

        from unif2ace.vq.magvitv2 import preprocess_image

        x = torch.cat(
            [preprocess_image(Image.fromarray(np.asarray(im)), self.image_size) for im in images]
        )
        with torch.no_grad():
            codes = self.magvit.get_code(x)
        sem, ide = self._embed(x)
        qs = [_qa(self.tok, q, None, True)[0] for q in questions]
        outs = generate_text(
            self.model,
            codes,
            qs,
            semantic=sem,  # raw, as training gets them: the model standardises them
            identity=ide,
            max_new_tokens=max_new_tokens,
        )
        return [self.tok.decode(o).strip() for o in outs]

    def caption(self, images, max_new_tokens: int = 160) -> list[str]:
        return self.answer(images, [CAPTION_QUESTION] * len(images), max_new_tokens)


def evaluate_paper(root, model_dir=None, *, split: str = "test", max_items: int = 256) -> dict:
    """The held-out loss of the run's model on ``features/<split>`` (t2i D3Diff and answer
    cross-entropy, fixed noise), written to ``<model>/eval_<split>.json``."""
    root = Path(root)
    run = read_run(root)
    folder = Path(model_dir) if model_dir else root / "model"
    if not (root / "features" / split / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{root}/features/{split} not found: encode that split first "
            f"(`unif2ace tokenize-images --split {split} --data DATASET --out {root}`)"
        )
    model = UniF2ace.from_pretrained(folder).eval()
    feats, data = _features(root, split)
    _check_features(model.config, feats)
    ds = PaperDataset(data, feats, PhiTokenizer(run["tokenizer"]), {})
    n = min(len(ds), max_items)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    with torch.no_grad():
        for s in range(0, n, 8):
            batch = collate(model.config, [ds[i] for i in range(s, min(n, s + 8))])
            _, parts = model(batch, loss=True, step=0, seed=1234)
            for k in ("loss_t2i", "loss_mmu"):
                if k in parts:
                    sums[k] = sums.get(k, 0.0) + float(parts[k])
                    counts[k] = counts.get(k, 0) + 1
    res = {
        "split": split,
        "items": n,
        **{k: sums[k] / counts[k] for k in sums},
        "model": str(folder),
    }
    atomic_write_json(folder / f"eval_{split}.json", res)
    return res


__all__ = [
    "PaperDataset",
    "PaperPipeline",
    "evaluate_paper",
    "init_config",
    "init_run",
    "is_paper_run",
    "read_run",
    "train_paper",
]
