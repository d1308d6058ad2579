"""SynthFace generator, dataset readers, text tokenizer and the model's special tokens.

- :mod:`unif2ace.data.taxonomy` — attribute categories and values
- :mod:`unif2ace.data.synthface` — the procedural dataset (``generate``, ``draw_arrays``)
- :mod:`unif2ace.data.readers` — caption / VQA / attribute records (JSON lines, JSON, Parquet)
- :mod:`unif2ace.data.text_tokenizer` — byte-level BPE (``TextTokenizer``)
- :mod:`unif2ace.data.special_tokens` — ``<|soi|>``, ``<|eoi|>``, ``<|t2i|>``, ``<|mmu|>``...
- :mod:`unif2ace.data.io` — atomic writes, safetensors + config.json checkpoints
"""

from unif2ace.data.readers import FieldMap, ReadStats, RecordError, load_split, read_records
from unif2ace.data.special_tokens import SPECIAL_TOKENS
from unif2ace.data.synthface import SynthFaceConfig, draw_arrays, draw_image, generate
from unif2ace.data.taxonomy import CATEGORIES, CATEGORY_NAMES, NUM_VALUES
from unif2ace.data.text_tokenizer import TextTokenizer

__all__ = [
    "CATEGORIES",
    "CATEGORY_NAMES",
    "NUM_VALUES",
    "SPECIAL_TOKENS",
    "FieldMap",
    "ReadStats",
    "RecordError",
    "SynthFaceConfig",
    "TextTokenizer",
    "draw_arrays",
    "draw_image",
    "generate",
    "load_split",
    "read_records",
]
