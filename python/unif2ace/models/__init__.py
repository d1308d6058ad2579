"""The UniF²ace model layer: configs, omni-attention, the two MoE levels, the transformer,
the sequence layout and sampling (thin modules over :mod:`unif2ace.ops`)."""

from unif2ace.models.config import CONFIGS, ModelConfig, get_config, parameter_count
from unif2ace.models.layout import CAPTION_PROMPT, TASK_MMU, TASK_T2I, Example, collate
from unif2ace.models.unif2ace import UniF2ace

__all__ = [
    "CAPTION_PROMPT",
    "CONFIGS",
    "TASK_MMU",
    "TASK_T2I",
    "Example",
    "ModelConfig",
    "UniF2ace",
    "collate",
    "get_config",
    "parameter_count",
]
