"""From files to a trained model and back: the assets of a run folder, the model's training data,
and :class:`Pipeline` (text → faces, image + question → answer, image → caption).

A run folder is what ``unif2ace data-all --out RUN`` writes (``RUN/synthface``,
``RUN/text_tokenizer``, ``RUN/vq``, ``RUN/encoders``, ``RUN/judge``) plus, after training,
``RUN/model``. The model's inputs per image — image codes and the two encoder embeddings — are
computed once per split and cached in ``RUN/model_data/{split}.pt``.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unif2ace.models.layout import (
    CAPTION_NO_REPEAT_NGRAM,
    CAPTION_PROMPT,
    TASK_MMU,
    TASK_T2I,
    Example,
)


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        root = path.parent if path.parent.name != "encoders" else path.parent.parent
        raise FileNotFoundError(
            f"{what} not found at {path} (run `unif2ace data-all --out {root}` first)"
        )
    return path


def check_images(images, size: int) -> np.ndarray:
    """PIL images or ``uint8 [N, H, W, 3]`` / ``[H, W, 3]`` arrays → ``uint8 [N, size, size, 3]``.
    Wrong mode, dtype or size raises a ValueError saying what was expected."""
    from PIL import Image

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
            raise ValueError(f"image {i}: expected uint8 [H, W, 3], got {im.dtype} {list(im.shape)}")
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
        from unif2ace.cli import load_encoder
        from unif2ace.data.text_tokenizer import TextTokenizer
        from unif2ace.vq.model import VQAutoencoder

        self.root = Path(root)
        self.tokenizer = TextTokenizer.from_file(
            _need(self.root / "text_tokenizer" / "tokenizer.json", "text tokenizer")
        )
        self.vq = VQAutoencoder.from_pretrained(_need(self.root / "vq", "image tokenizer"))
        self.semantic = load_encoder(_need(self.root / "encoders" / "semantic", "semantic encoder"))
        self.identity = load_encoder(_need(self.root / "encoders" / "identity", "identity encoder"))

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
        for p in ("text_tokenizer/tokenizer.json", "vq/model.safetensors",
                  "encoders/semantic/model.safetensors", "encoders/identity/model.safetensors"):  # fmt: skip
            st = (self.root / p).stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def encode_images(self, images, batch: int = 256) -> tuple[torch.Tensor, ...]:
        """uint8 images → (codes int64 [N, h·w], semantic [N, Ds], identity [N, Di])."""
        from unif2ace.encoders.cnn import to_tensor

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


@dataclass
class SplitData:
    """One split, ready for the model: per image codes, embeddings, labels, caption and caption
    categories; VQA as (image index, question, answer, type, attribute)."""

    ids: list[str]
    codes: torch.Tensor  # int16 [N, T]
    semantic: torch.Tensor  # [N, Ds]
    identity: torch.Tensor  # [N, Di]
    labels: np.ndarray  # int64 [N, C]
    captions: list[str]
    caption_attributes: list[list[str]]
    attributes: list[dict]
    vqa: list[tuple[int, str, str, str, str]]


def prepare_split(assets: Assets, split: str, progress: bool = True) -> SplitData:
    """Build (or load from ``RUN/model_data/{split}.pt``) the model inputs of a SynthFace split."""
    from unif2ace.data.io import atomic_torch_save
    from unif2ace.data.readers import (
        ReadStats,
        find_split_file,
        iter_rows,
        load_split,
        read_records,
    )

    data = _need(assets.root / "synthface", "SynthFace data")
    cache = assets.root / "model_data" / f"{split}.pt"
    key = assets.fingerprint()
    if cache.is_file():
        obj = torch.load(cache, weights_only=False)
        if obj.get("key") == key:
            return obj["data"]
    t0 = time.perf_counter()
    arr = load_split(data, split, progress=progress)
    codes, sem, ide = assets.encode_images(arr.images)
    index = {iid: i for i, iid in enumerate(arr.ids)}
    caps, _ = read_records(find_split_file(data, "captions", split), "caption",
                           check_images=False, image_root=data)  # fmt: skip
    if len(caps) != len(arr.ids):
        raise ValueError(f"{data}: {len(caps)} captions for {len(arr.ids)} images in {split}")
    captions = [""] * len(arr.ids)
    for r in caps:
        if r.id in index:
            captions[index[r.id]] = r.texts[0]
    stats = ReadStats()
    cap_attrs: list[list[str]] = [[] for _ in arr.ids]
    attributes: list[dict] = [{} for _ in arr.ids]
    for _, row in iter_rows(find_split_file(data, "attributes", split), "auto", "raise", stats):
        if str(row.get("id")) in index:
            cap_attrs[index[str(row["id"])]] = list(row.get("caption_attributes") or [])
            attributes[index[str(row["id"])]] = dict(row.get("attributes") or {})
    vqa = []
    for _, row in iter_rows(find_split_file(data, "vqa", split), "auto", "raise", stats):
        i = index.get(Path(str(row["image"])).stem)
        if i is not None:
            vqa.append((i, row["question"], str(row["answer"]), row.get("type", "open"),
                        row.get("attribute", "")))  # fmt: skip
    sd = SplitData(list(arr.ids), codes.to(torch.int16), sem, ide, arr.labels, captions,
                   cap_attrs, attributes, vqa)  # fmt: skip
    atomic_torch_save({"key": key, "data": sd}, cache)
    if progress:
        print(f"prepared {split}: {len(arr.ids)} images, {len(vqa)} VQA in "
              f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    return sd


class UnifiedDataset(torch.utils.data.Dataset):
    """Training items of one split: per image ``t2i_per_image`` text→image examples (its caption
    as prompt; each copy draws its own mask time), a captioning example, and up to
    ``vqa_per_image`` of its VQA pairs, ``vqa_turns`` to a row (a conversation about the image,
    in an order drawn once per image, so any kind of question comes first in some rows). Each
    item is an :class:`Example`."""

    def __init__(self, split: SplitData, tokenizer, *, vqa_per_image: int | None = None,
                 tasks: tuple[str, ...] = ("t2i", "caption", "vqa"), t2i_per_image: int = 1,
                 vqa_turns: int = 1):  # fmt: skip
        unknown = set(tasks) - {"t2i", "caption", "vqa"}
        if unknown or not tasks:
            raise ValueError(f"tasks must be a non-empty subset of t2i, caption, vqa; got {list(tasks)}")
        if t2i_per_image < 1:
            raise ValueError(f"t2i_per_image must be >= 1, got {t2i_per_image}")
        if vqa_turns < 1:
            raise ValueError(f"vqa_turns must be >= 1, got {vqa_turns}")
        self.split = split
        enc = tokenizer.encode
        self.caption_ids = [enc(c) for c in split.captions]
        self.caption_prompt = enc(CAPTION_PROMPT)
        # (task, image, VQA record indices: () for t2i and captions)
        self.items: list[tuple[int, int, tuple[int, ...]]] = []
        for i in range(len(split.ids)):
            if "t2i" in tasks:
                self.items += [(TASK_T2I, i, ())] * t2i_per_image
            if "caption" in tasks:
                self.items.append((TASK_MMU, i, ()))
        if "vqa" in tasks:
            per_image: dict[int, list[int]] = {}
            for j, (i, *_rest) in enumerate(split.vqa):
                js = per_image.setdefault(i, [])
                if vqa_per_image is None or len(js) < vqa_per_image:
                    js.append(j)
            for i, js in per_image.items():
                if vqa_turns > 1:  # SynthFace alternates open and yes/no: mix the order
                    g = np.random.default_rng(i)
                    js = [js[k] for k in g.permutation(len(js))]
                self.items += [(TASK_MMU, i, tuple(js[k : k + vqa_turns]))
                               for k in range(0, len(js), vqa_turns)]  # fmt: skip
        self.vqa_ids = {j: (enc(q), enc(a)) for j, (_, q, a, *_r) in enumerate(split.vqa)
                        if "vqa" in tasks}  # fmt: skip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, n: int) -> Example:
        task, i, js = self.items[n]
        s = self.split
        codes = s.codes[i].long()
        if task == TASK_T2I:
            return Example(TASK_T2I, codes, self.caption_ids[i], index=n)
        if not js:
            q, a, more = self.caption_prompt, self.caption_ids[i], ()
        else:
            (q, a), more = self.vqa_ids[js[0]], tuple(self.vqa_ids[j] for j in js[1:])
        return Example(TASK_MMU, codes, q, a, s.semantic[i], s.identity[i], index=n, turns=more)


class Pipeline:
    """A trained model with its tokenizers and encoders: text → faces, image + question → answer,
    image → caption. ``Pipeline.load(RUN)`` reads ``RUN/model`` and the run's assets."""

    def __init__(self, model, assets: Assets):
        self.model, self.assets = model.eval(), assets
        if model.config.image_tokens != assets.vq.config.tokens_side**2:
            raise ValueError("the model and the image tokenizer disagree on tokens per image")

    @classmethod
    def load(cls, root, model_dir=None) -> Pipeline:
        from unif2ace.models import UniF2ace

        root = Path(root)
        model = UniF2ace.from_pretrained(_need(Path(model_dir or root / "model"), "trained model"))
        return cls(model, Assets(root))

    def _tokens(self, texts: list[str], what: str) -> list[list[int]]:
        out = []
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"{what} {i} is empty")
            out.append(self.assets.tokenizer.encode(t))
        return out

    def generate(self, prompts: list[str], *, steps: int = 12, guidance: float = 2.0,
                 temperature: float = 1.0, seed: int = 0, batch: int = 32) -> np.ndarray:  # fmt: skip
        """Faces ``uint8 [N, H, W, 3]`` for text prompts."""
        from unif2ace.models.sampling import generate_images

        toks = self._tokens(list(prompts), "prompt")
        codes = [
            generate_images(self.model, toks[i : i + batch], steps=steps, guidance=guidance,
                            temperature=temperature, seed=seed + i)
            for i in range(0, len(toks), batch)
        ]  # fmt: skip
        return self.assets.decode_codes(torch.cat(codes))

    def answer(self, images, questions: list[str], *, max_new_tokens: int = 16,
               batch: int = 32, no_repeat_ngram: int = 0) -> list[str]:  # fmt: skip
        """Answers to one question per image."""
        from unif2ace.models.sampling import generate_text

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
            ans = generate_text(self.model, codes, toks[i : i + batch], semantic=sem,
                                identity=ide, max_new_tokens=max_new_tokens,
                                no_repeat_ngram=no_repeat_ngram)  # fmt: skip
            out += [self.assets.tokenizer.decode(a).strip() for a in ans]
        return out

    def caption(self, images, *, max_new_tokens: int | None = None, batch: int = 32,
                no_repeat_ngram: int = CAPTION_NO_REPEAT_NGRAM) -> list[str]:  # fmt: skip
        """A fine-grained caption per image (greedy, no repeated ``no_repeat_ngram``-grams)."""
        images = check_images(images, self.assets.image_size)
        return self.answer(images, [CAPTION_PROMPT] * len(images),
                           max_new_tokens=max_new_tokens or self.model.config.max_text_len,
                           batch=batch, no_repeat_ngram=no_repeat_ngram)  # fmt: skip
