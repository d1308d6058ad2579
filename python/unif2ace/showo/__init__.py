"""The released Show-o checkpoints on the engine's ops (the starting point of UniF²ace).

* :func:`load_showo` — a Show-o folder as a :class:`~unif2ace.models.UniF2ace` (QK-norm, Show-o's
  vocabulary, MoE levels off); :class:`ShowoVocab` and :class:`PhiTokenizer` — its ids, layouts
  and text tokenizer.
* :func:`showo_logits`, :func:`t2i_generate`, :func:`mmu_answer`, :func:`mmu_answer_clip` — Show-o's
  forward, image generation and question answering.
* :class:`ShowoPipeline` — the folders on disk (Show-o, MAGVIT-v2, the tokenizer, optionally the
  CLIP tower) as ``generate`` / ``answer``.
"""

from unif2ace.showo.checkpoint import load_showo, read_showo_config
from unif2ace.showo.generate import mmu_answer, mmu_answer_clip, showo_logits, t2i_generate
from unif2ace.showo.pipeline import ShowoPipeline
from unif2ace.showo.rules import attention_rule
from unif2ace.showo.vocab import PhiTokenizer, ShowoVocab

__all__ = [
    "PhiTokenizer",
    "ShowoPipeline",
    "ShowoVocab",
    "attention_rule",
    "load_showo",
    "mmu_answer",
    "mmu_answer_clip",
    "read_showo_config",
    "showo_logits",
    "t2i_generate",
]
