"""Generic training: config dataclasses from YAML, a DDP/FSDP2-ready loop with atomic
checkpoints and exact resume. Model-agnostic: the model layer supplies a module, a dataset, a
collate function and a loss function."""

from unif2ace.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
)
from unif2ace.train.config import (
    TrainConfig,
    apply_overrides,
    load_config,
    load_sections,
    merge_dataclass,
    parse_override,
)
from unif2ace.train.trainer import GlobalOrder, build_optimizer, lr_at, train, unwrap_model

__all__ = [
    "GlobalOrder",
    "TrainConfig",
    "apply_overrides",
    "build_optimizer",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_config",
    "load_sections",
    "lr_at",
    "merge_dataclass",
    "parse_override",
    "read_checkpoint",
    "train",
    "unwrap_model",
]
