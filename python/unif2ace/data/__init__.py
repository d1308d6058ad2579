"""SynthFace generator, dataset readers and the text tokenizer.

- :mod:`unif2ace.data.taxonomy` — attribute categories and values
- :mod:`unif2ace.data.synthface` — the procedural dataset (``generate``, ``draw_arrays``)
- :mod:`unif2ace.data.readers` — caption / VQA / attribute records (JSON lines, JSON, Parquet)
- :mod:`unif2ace.data.text_tokenizer` — byte-level BPE (``TextTokenizer``)

The special tokens belong to the model's vocabulary: :mod:`unif2ace.models.special_tokens`.
"""

from unif2ace.data.readers import FieldMap, ReadStats, RecordError, load_split, read_records
from unif2ace.data.synthface import SynthFaceConfig, draw_arrays, draw_image, generate
from unif2ace.data.taxonomy import CATEGORIES, CATEGORY_NAMES, NUM_VALUES
from unif2ace.data.text_tokenizer import TextTokenizer

__all__ = [
    "CATEGORIES",
    "CATEGORY_NAMES",
    "NUM_VALUES",
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
