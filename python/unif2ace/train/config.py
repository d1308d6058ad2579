"""Training configuration: dataclasses read from YAML, then ``key=value`` overrides.

Every value is checked against its field's type (``int``, ``float``, ``str``, ``bool``, tuples,
lists, dicts, ``X | None``, nested dataclasses) and an unknown key is an error that names the key
and its close matches, so a typo in a config file or on the command line never silently trains
with the default. The same helpers read any dataclass (the model config is another one), and a
YAML file with one section per dataclass (``train:``, ``model:``) is read by :func:`load_sections`::

    cfg = load_config("train.yaml", ["lr=3e-4", "steps=200"])
    both = load_sections("run.yaml", ["train.lr=3e-4", "model.dim=64"],
                         {"train": TrainConfig, "model": ModelConfig})
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

AMP_CHOICES = ("auto", "bf16", "none")
PARALLEL_CHOICES = ("auto", "none", "ddp", "fsdp2")


@dataclass
class TrainConfig:
    out: str = "runs/train"  # output folder: checkpoints/, log.jsonl
    steps: int = 1000
    batch_size: int = 16  # GLOBAL batch per optimizer step (all ranks, all micro-steps)
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip_grad_norm: float = 1.0  # <= 0: no clipping (the norm is still logged)
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: evaluate at every checkpoint (when an eval_fn is given)
    amp: str = "auto"  # "auto" (bf16 autocast on CUDA, none on CPU) | "bf16" | "none"
    parallel: str = "auto"  # "auto" (ddp when WORLD_SIZE>1 else none) | "none" | "ddp" | "fsdp2"
    device: str = "auto"  # "auto": cuda:LOCAL_RANK when CUDA is available, else cpu
    progress: bool = True
    # a model folder (safetensors, as save_pretrained writes it; sharded with an index.json or
    # not) the run starts from; ignored when the run resumes from its own checkpoint. A model
    # built on the meta device is sharded before it gets storage and each rank reads only its
    # shard (see unif2ace.train.sharded)
    init_from: str | None = None
    activation_checkpointing: bool = False  # each shard unit recomputes its forward in backward
    # torch.compile the wrapped model (parallel "none" or "ddp"); the loss function should give
    # the model inputs whose sizes are marked dynamic, as UniF2ace's does, so that one graph
    # serves every batch (see UniF2ace.compile_loss); the first step compiles
    compile: bool = False

    def __post_init__(self):
        _choice("amp", self.amp, AMP_CHOICES)
        _choice("parallel", self.parallel, PARALLEL_CHOICES)
        for name in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.compile and self.parallel == "fsdp2":
            raise ValueError(
                "train.compile: torch.compile of an FSDP2 model is not supported here yet; "
                "use parallel=ddp or compile=false"
            )
        if self.init_from is not None and not str(self.init_from).strip():
            raise ValueError("init_from must be a model folder or null, got an empty string")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(map(repr, choices))}")


# ---------------------------------------------------------------------------------------------
# mapping -> dataclass, with type checks


def merge_dataclass(cls, mapping: Mapping | None, where: str = "config", base=None):
    """An instance of dataclass ``cls``: ``base`` (default: the field defaults) with the entries
    of ``mapping`` applied. Nested dataclass fields take a nested mapping. Raises ``ValueError``
    naming ``where.key`` for an unknown key (with close matches) or a value of the wrong type."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    mapping = {} if mapping is None else mapping
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{where}: expected a mapping of keys, got {type(mapping).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values = {}
    for key, value in mapping.items():
        if key not in fields:
            raise ValueError(_unknown_key(str(key), list(fields), where))
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            inner = getattr(base, key) if base is not None else None
            values[key] = merge_dataclass(tp, value, f"{where}.{key}", base=inner)
        else:
            values[key] = _coerce(value, tp, f"{where}.{key}")
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _unknown_key(key: str, known: list[str], where: str, what: str = "key") -> str:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return f"{where}: unknown {what} {key!r}{hint} (known {what}s: {', '.join(known)})"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# annotations taken as they are: type -> (whether a value is one, what the error says is expected)
_SCALARS = {
    bool: (lambda v: isinstance(v, bool), "a bool (true/false)"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an int"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _coerce(value, tp, where: str):
    """``value`` checked against (and mildly converted to) the annotation ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ValueError:
                pass
        raise ValueError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ValueError(f"{where}: expected one of {list(args)}, got {value!r}")
    if tp in _SCALARS:
        accepts, what = _SCALARS[tp]
        if accepts(value):
            return value
        raise ValueError(f"{where}: expected {what}, got {value!r} ({type(value).__name__})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads ``1e-3`` (no dot) as a string; accept what float() accepts
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{where}: expected a float, got {value!r} ({type(value).__name__})")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ValueError(f"{where}: expected a path, got {value!r}")
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list/tuple, got {value!r}")
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            el = args[0] if args else typing.Any
            return tuple(_coerce(v, el, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{where}: expected {len(args)} items, got {len(value)}: {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        el = args[0] if args else typing.Any
        return [_coerce(v, el, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        raise ValueError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ValueError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# YAML + overrides


def read_yaml(path) -> dict:
    """The top-level mapping of a YAML file (an empty file is ``{}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (expected a YAML recipe)") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return dict(data)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line from PyYAML's error: what is wrong and where (its own text spans lines)."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        mark = e.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return f"{e.problem}{where}"
    return " ".join(str(e).split())


def parse_override(item: str) -> tuple[str, object]:
    """``"a.b=1e-3"`` -> ``("a.b", 0.001)``; the value is read with ``yaml.safe_load``."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {item!r} is not key=value")
    try:
        return key, yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        problem = _yaml_problem(e)
        raise ValueError(f"override {item!r}: the value is not valid YAML: {problem}") from None


def _set_dotted(tree: dict, key: str, value, where: str) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ValueError(f"{where}: {'.'.join(parts[: i + 1])} is not a section")
        else:
            child = node[part] = dict(child)
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: Mapping, overrides: list[str] | None, where: str = "config") -> dict:
    """A copy of ``tree`` with ``key=value`` items applied (dotted keys go into sub-mappings)."""
    tree = dict(tree)
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value, where)
    return tree


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    cls=TrainConfig,
    section: str | None = None,
):
    """``cls`` from an optional YAML file (its ``section`` mapping when given) with ``key=value``
    overrides applied; with a section, override keys may carry its prefix (``train.lr=1e-3``)."""
    tree = read_yaml(path) if path else {}
    where = section or cls.__name__
    if section is not None:
        sub = tree.get(section) or {}
        if not isinstance(sub, Mapping):
            raise ValueError(f"{path}: section {section!r} is not a mapping")
        tree = dict(sub)
        prefix = section + "."
        overrides = [o[len(prefix) :] if o.startswith(prefix) else o for o in overrides or []]
    if path:
        where = f"{path}: {where}"
    return merge_dataclass(cls, apply_overrides(tree, overrides, where), where)


def load_sections(path: str | Path | None, overrides: list[str] | None, sections: dict) -> dict:
    """One dataclass per top-level YAML section: ``{"train": TrainConfig, "model": M}`` ->
    ``{"train": TrainConfig(...), "model": M(...)}``. Overrides are ``section.key=value``; an
    unknown section (in the file or an override) is an error."""
    tree = read_yaml(path) if path else {}
    where = str(path) if path else "overrides"
    for item in overrides or []:
        key, _ = parse_override(item)
        if "." not in key:
            raise ValueError(
                f"override {item!r}: expected section.key=value ({', '.join(sections)})"
            )
    tree = apply_overrides(tree, overrides, where)
    for name in tree:
        if name not in sections:
            raise ValueError(_unknown_key(str(name), list(sections), where, "section"))
    return {
        name: merge_dataclass(cls, tree.get(name), f"{where}: {name}")
        for name, cls in sections.items()
    }
