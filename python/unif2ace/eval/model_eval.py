"""Evaluate a trained UniF²ace on a SynthFace split (the paper's metrics, at our scale).

* **generation attribute accuracy** — test captions as prompts → generated faces → the attribute
  judge; mean per-attribute accuracy over the attributes each prompt mentions (our VQAScore
  analogue), with the chance levels of the same attributes;
* **Fréchet distance** between generated and real test faces in the judge's feature space;
* **VQA exact-match accuracy** on the test questions (open and yes/no);
* **caption attribute precision / recall / F1** (our Desc-GPT analogue): the attributes a generated
  caption states, checked against the attribute file; recall against what the reference caption
  mentions.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import torch
from tqdm.auto import tqdm

from unif2ace.eval import metrics
from unif2ace.eval.judge import judge_features, judge_predict
from unif2ace.models.layout import CAPTION_NO_REPEAT_NGRAM, CAPTION_PROMPT
from unif2ace.models.sampling import generate_images, generate_text


def _batches(n: int, size: int, desc: str, progress: bool):
    return tqdm(range(0, n, size), desc=desc, disable=not progress, unit="batch")


@torch.no_grad()
def evaluate_model(
    model,
    assets,
    test,
    judge,
    *,
    train_labels: np.ndarray | None = None,
    real_images: np.ndarray | None = None,
    n_gen: int = 256,
    n_vqa: int = 512,
    n_cap: int = 256,
    steps: int = 12,
    guidance: float = 2.0,
    seed: int = 0,
    batch: int = 32,
    progress: bool = True,
) -> tuple[dict, dict]:
    """Scores of ``model`` on the split ``test`` (:class:`~unif2ace.pipeline.SplitData`).

    Returns ``(metrics, samples)``; samples holds the generated images, prompts, captions and
    answers for the demo's report. ``real_images``: the split's first images (for the Fréchet
    distance; skipped without them)."""
    model.eval()
    tok = assets.tokenizer
    out: dict = {}
    samples: dict = {}
    t0 = time.perf_counter()

    # --- text -> image ---------------------------------------------------------------------
    n = min(n_gen, len(test.ids))
    if n:
        prompts = test.captions[:n]
        toks = [tok.encode(p) for p in prompts]
        codes = torch.cat(
            [
                generate_images(
                    model, toks[i : i + batch], steps=steps, guidance=guidance, seed=seed + i
                )
                for i in _batches(n, batch, "generate", progress)
            ]
        )
        images = assets.decode_codes(codes)
        pred = judge_predict(judge, images)
        targets, mask = metrics.encode_targets(test.attributes[:n], test.caption_attributes[:n])
        gen = metrics.generation_accuracy(pred, targets, mask)
        if train_labels is not None:
            gen["chance"] = metrics.chance_levels(train_labels, targets, mask)
        out["generation"] = gen
        if real_images is not None and len(real_images) >= 2 and n >= 2:
            out["frechet_judge"] = metrics.frechet_distance(
                judge_features(judge, images), judge_features(judge, real_images[:n])
            )
            out["frechet_judge_real_vs_real"] = _real_floor(judge, real_images[:n], judge_features)
        samples.update(prompts=prompts, images=images)

    # --- VQA -------------------------------------------------------------------------------
    vqa = test.vqa[:n_vqa]
    if vqa:
        answers: list[str] = []
        for i in _batches(len(vqa), batch, "vqa", progress):
            chunk = vqa[i : i + batch]
            idx = torch.tensor([c[0] for c in chunk])
            ans = generate_text(
                model,
                test.codes[idx].long(),
                [tok.encode(c[1]) for c in chunk],
                semantic=test.semantic[idx],
                identity=test.identity[idx],
                max_new_tokens=12,
            )
            answers += [tok.decode(a).strip() for a in ans]
        out["vqa"] = metrics.vqa_accuracy(answers, [c[2] for c in vqa], [c[3] for c in vqa])
        out["vqa"]["chance"] = _vqa_chance(vqa)
        samples["vqa"] = [(c[0], c[1], c[2], a) for c, a in zip(vqa, answers)]

    # --- captions --------------------------------------------------------------------------
    n = min(n_cap, len(test.ids))
    if n:
        caps: list[str] = []
        q = tok.encode(CAPTION_PROMPT)
        for i in _batches(n, batch, "caption", progress):
            idx = torch.arange(i, min(i + batch, n))
            ans = generate_text(
                model,
                test.codes[idx].long(),
                [q] * len(idx),
                semantic=test.semantic[idx],
                identity=test.identity[idx],
                max_new_tokens=model.config.max_text_len,
                no_repeat_ngram=CAPTION_NO_REPEAT_NGRAM,
            )
            caps += [tok.decode(a).strip() for a in ans]
        out["caption"] = metrics.caption_scores(
            caps, test.attributes[:n], test.caption_attributes[:n]
        )
        # chance: the reference caption of another face of the split
        other = np.random.default_rng(seed).permutation(len(test.ids))[:n]
        out["caption"]["chance_f1"] = metrics.caption_scores(
            [test.captions[j] for j in other], test.attributes[:n], test.caption_attributes[:n]
        )["f1"]
        samples["captions"] = caps
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out, samples


def _vqa_chance(vqa) -> float:
    """A blind baseline: answer each question with the answer the *other* records asking the same
    question most often have (leave-one-out; a question asked once falls back to its type's most
    common answer). No image is seen."""
    norm = metrics.normalize_answer
    by_q: dict[str, Counter] = {}
    by_t: dict[str, Counter] = {}
    for c in vqa:
        by_q.setdefault(c[1], Counter())[norm(c[2])] += 1
        by_t.setdefault(c[3], Counter())[norm(c[2])] += 1
    pred = []
    for c in vqa:
        others = by_q[c[1]].copy()
        others[norm(c[2])] -= 1
        others = +others  # drop zero counts
        pool = others if others else by_t[c[3]]
        pred.append(pool.most_common(1)[0][0])
    return metrics.vqa_accuracy(pred, [c[2] for c in vqa])["accuracy"]


def _real_floor(judge, real: np.ndarray, features) -> float | None:
    """Fréchet distance between two halves of the real images: the floor a generator of the same
    sample size can reach (small samples bias the distance upwards)."""
    h = len(real) // 2
    if h < 2:
        return None
    return metrics.frechet_distance(features(judge, real[:h]), features(judge, real[h : 2 * h]))


def summary_rows(m: dict) -> list[tuple[str, str]]:
    """(metric, value) rows of a metrics dict for a markdown table."""
    rows = []
    g = m.get("generation")
    if g:
        ch = g.get("chance", {})
        extra = ""
        if ch:
            extra = (
                f" (chance: majority {ch['majority_mean']:.3f}, uniform {ch['uniform_mean']:.3f})"
            )
        rows.append(("generation attribute accuracy (judge)", f"{g['mean']:.3f}{extra}"))
    if "frechet_judge" in m:
        floor = m.get("frechet_judge_real_vs_real")
        rows.append(
            (
                "Fréchet distance, judge features",
                f"{m['frechet_judge']:.2f}"
                + (f" (real vs real: {floor:.2f})" if floor is not None else ""),
            )
        )
    v = m.get("vqa")
    if v:
        rows.append(
            ("VQA exact match", f"{v['accuracy']:.3f} (blind majority answer {v['chance']:.3f})")
        )
    c = m.get("caption")
    if c:
        rows.append(
            (
                "caption attribute P / R / F1",
                f"{c['precision']:.3f} / {c['recall']:.3f} / {c['f1']:.3f} "
                f"(chance F1 {c['chance_f1']:.3f})",
            )
        )
    return rows
