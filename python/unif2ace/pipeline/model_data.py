"""The model's training data from a run folder: per image its codes, the two encoder embeddings,
labels, caption and VQA (:class:`SplitData`, computed once per split and cached in
``RUN/model_data/{split}.pt``, keyed by the content hash of the assets and the dataset records),
and the training items built from them (:class:`UnifiedDataset`). A cache that does not load or
belongs to other assets is rebuilt.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unif2ace.data.readers import ReadStats, find_split_file, iter_rows, load_split, read_records
from unif2ace.io import atomic_torch_save, error_line
from unif2ace.models.layout import CAPTION_PROMPT, TASK_MMU, TASK_T2I, Example
from unif2ace.pipeline.assets import Assets, require


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
    data = require(assets.root / "synthface", "SynthFace data")
    cache = assets.root / "model_data" / f"{split}.pt"
    key = assets.fingerprint()
    if cache.is_file():
        try:
            obj = torch.load(cache, weights_only=False)  # our own file: a full unpickle is fine
        except Exception as e:  # noqa: BLE001 - a torn or damaged cache is rebuilt, whatever it raises
            logging.getLogger(__name__).warning(
                "warning: %s does not load (%s); rebuilding it", cache, error_line(e)
            )
            obj = None
        if (
            isinstance(obj, dict)
            and obj.get("key") == key
            and isinstance(obj.get("data"), SplitData)
        ):
            return obj["data"]
    t0 = time.perf_counter()
    arr = load_split(data, split, progress=progress)
    codes, sem, ide = assets.encode_images(arr.images)
    index = {iid: i for i, iid in enumerate(arr.ids)}
    caps, _ = read_records(
        find_split_file(data, "captions", split), "caption", check_images=False, image_root=data
    )
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
            vqa.append(
                (
                    i,
                    row["question"],
                    str(row["answer"]),
                    row.get("type", "open"),
                    row.get("attribute", ""),
                )
            )
    sd = SplitData(
        list(arr.ids),
        codes.to(torch.int16),
        sem,
        ide,
        arr.labels,
        captions,
        cap_attrs,
        attributes,
        vqa,
    )
    atomic_torch_save({"key": key, "data": sd}, cache)
    if progress:
        print(
            f"prepared {split}: {len(arr.ids)} images, {len(vqa)} VQA in "
            f"{time.perf_counter() - t0:.1f} s"
        )
    return sd


class UnifiedDataset(torch.utils.data.Dataset):
    """Training items of one split: per image ``t2i_per_image`` text→image examples (its caption
    as prompt; each copy draws its own mask time), a captioning example, and up to
    ``vqa_per_image`` of its VQA pairs, ``vqa_turns`` to a row (a conversation about the image,
    in an order drawn once per image, so any kind of question comes first in some rows). Each
    item is an :class:`Example`."""

    def __init__(
        self,
        split: SplitData,
        tokenizer,
        *,
        vqa_per_image: int | None = None,
        tasks: tuple[str, ...] = ("t2i", "caption", "vqa"),
        t2i_per_image: int = 1,
        vqa_turns: int = 1,
    ):
        unknown = set(tasks) - {"t2i", "caption", "vqa"}
        if unknown or not tasks:
            raise ValueError(
                f"tasks must be a non-empty subset of t2i, caption, vqa; got {list(tasks)}"
            )
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
                self.items += [
                    (TASK_MMU, i, tuple(js[k : k + vqa_turns]))
                    for k in range(0, len(js), vqa_turns)
                ]
        self.vqa_ids = {
            j: (enc(q), enc(a)) for j, (_, q, a, *_r) in enumerate(split.vqa) if "vqa" in tasks
        }

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
