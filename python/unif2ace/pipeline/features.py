"""The feature cache of a UniF²aceD-1M split (``unif2ace tokenize-images``): every image encoded
once, before fine-tuning from Show-o, into its MAGVIT-v2 codes and, when asked, its CLIP and
face-identity embeddings, so that training never runs the tokenizer or the encoders.

Layout of the cache folder::

    manifest.json              what the cache holds and what made it (below)
    shard_00000.safetensors    images 0 .. S-1 (S = shard size), in the dataset's image order
    shard_00001.safetensors    ...

A shard holds ``codes`` ``int16 [n, T]`` (T = codes per image, row-major), ``clip`` ``float32
[n, Dc]`` and ``face`` ``float32 [n, Df]`` (only when those encoders were given; L2-normalised as
the adapters return them) and ``index`` ``int64 [n]`` (the images' indices in
:func:`unif2ace.data.unif2aced.read_unif2aced`'s list); its safetensors metadata carries the
manifest's ``fingerprint``. ``manifest.json`` holds the dataset folder and split, the number of
images and a hash of the image list (relative paths and file sizes), the image size, the shard
size, codes per image and, per encoder, where it came from, a sha256 of its weights (of the
loaded state dict for torch models, so a folder and the same model passed loaded agree; of the
file for an ONNX model), its dtype and embedding size; ``fingerprint`` is a hash of all of that
but the paths (a moved dataset or weights folder still resumes), and ``complete`` turns true
when the last shard is written.

Resuming: a shard file is written atomically (:func:`unif2ace.io.atomic_write_bytes`), so a
killed run leaves whole shards only; the next run keeps every shard that verifies (keys, dtypes,
shapes, its index range and the fingerprint) and writes the others. A folder made from another
image list, image size, shard size or other encoders is refused (naming what differs) unless
``force=True``, which deletes its shards first. The writer holds the folder's lock
(:func:`unif2ace.io.lock_folder`); :class:`FeatureCache` reads under a shared one.

Pixels: each image is decoded (:func:`unif2ace.data.readers.load_image`) and prepared as Show-o
prepares it (:func:`unif2ace.vq.magvitv2.preprocess_image`: short side to ``image_size``, centre
crop, [-1, 1]); the CLIP and face encoders get that same ``[B, 3, S, S]`` tensor and resize it to
their own input size. The face model must take 112×112 inputs (ArcFace-style recognition models
such as AntelopeV2's ``glintr100.onnx``); another input size is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from unif2ace.data.readers import load_image
from unif2ace.data.unif2aced import UniF2aceData, read_unif2aced
from unif2ace.io import atomic_write_bytes, atomic_write_json, lock_folder, sha256_file
from unif2ace.vq.magvitv2 import MagvitV2, load_magvitv2, preprocess_image

FORMAT = "unif2ace-features"
VERSION = 1
MANIFEST = "manifest.json"
FACE_INPUT = (112, 112)
_DTYPES = {"codes": "I16", "clip": "F32", "face": "F32", "index": "I64"}


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def image_list_sha256(data: UniF2aceData) -> str:
    """sha256 of the split's image list: each image's relative path and file size, in order."""
    h = hashlib.sha256()
    for rel in data.images:
        size = os.stat(data.root / rel).st_size
        h.update(f"{rel}\t{size}\n".encode())
    return h.hexdigest()


def state_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict: every tensor's name, dtype, shape and bytes, by name."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# encoders


def _is_path(x) -> bool:
    return isinstance(x, (str, os.PathLike))


def _load_magvit(magvit, device) -> tuple[MagvitV2, dict]:
    if _is_path(magvit):
        source = str(Path(magvit).resolve())
        model = load_magvitv2(magvit, device=device or _default_device())
    elif isinstance(magvit, MagvitV2):
        source, model = None, magvit.eval()
    else:
        raise TypeError(
            f"magvit must be a MAGVIT-v2 folder or a loaded MagvitV2, got {type(magvit).__name__}"
        )
    cfg = model.config
    if cfg.codebook_size > 2**15:
        raise ValueError(
            f"MAGVIT-v2 with {cfg.codebook_size} codes: the cache stores codes as int16 "
            "(at most 32768 codes)"
        )
    return model, {
        "source": source,
        "class": "MagvitV2",
        "weights_sha256": state_sha256(model),
        "dtype": str(model.dtype).removeprefix("torch."),
        "codebook_size": cfg.codebook_size,
        "downsample": cfg.downsample,
    }


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_embedder(kind: str, spec, device) -> tuple[object, dict]:
    """``spec``: a path (CLIP folder / face ONNX file) or an object with ``embed`` and ``dim``."""
    from unif2ace.encoders.adapters import ClipVisionAdapter, OnnxFaceAdapter

    source = None
    if _is_path(spec):
        source = str(Path(spec).resolve())
        if kind == "clip":
            obj = ClipVisionAdapter(spec, device=device or _default_device())
        else:
            providers = ["CPUExecutionProvider"]
            if (device or _default_device()).startswith("cuda"):
                import onnxruntime as ort

                if "CUDAExecutionProvider" in ort.get_available_providers():
                    providers.insert(0, "CUDAExecutionProvider")
            obj = OnnxFaceAdapter(spec, providers=tuple(providers))
    elif callable(getattr(spec, "embed", None)):
        obj = spec
    else:
        raise TypeError(
            f"{kind} must be a path or an object with .embed(images) and .dim, got "
            f"{type(spec).__name__}"
        )
    if _is_path(spec) and Path(spec).is_file():
        weights = sha256_file(spec)
    elif isinstance(getattr(obj, "fingerprint", None), str):
        weights = obj.fingerprint
    elif isinstance(getattr(obj, "model", None), torch.nn.Module):
        weights = state_sha256(obj.model)
    else:  # an object that says nothing about its weights: only its class is recorded
        weights = None
    size = getattr(obj, "size", None)
    return obj, {
        "source": source,
        "class": type(obj).__name__,
        "weights_sha256": weights,
        "input_size": list(size) if isinstance(size, tuple) else size,
    }


def check_face_input(face, source: str) -> None:
    """Refuse a face model whose input is not 112×112, naming what its ONNX declares."""
    size = getattr(face, "size", None)
    if size is None:
        return
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if hw != FACE_INPUT:
        declared = ""
        session = getattr(face, "session", None)
        if session is not None:
            inp = session.get_inputs()[0]
            declared = f" (its ONNX input {inp.name!r} declares shape {list(inp.shape)})"
        raise ValueError(
            f"face model {source}: takes {hw[0]}×{hw[1]} images{declared}; expected a "
            f"{FACE_INPUT[0]}×{FACE_INPUT[1]} face-recognition model (ArcFace-style, e.g. "
            "AntelopeV2's glintr100.onnx)"
        )


def _probe_dim(obj, kind: str, source: str, size: int, expect: int | None) -> int:
    """The embedding size, from one blank image; checked against the declared ``dim`` and
    ``expect``."""
    out = obj.embed(torch.zeros(1, 3, size, size))
    if not torch.is_tensor(out) or out.dim() != 2 or out.shape[0] != 1:
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(f"{kind} encoder {source}: embed must return [N, D], got {got} for N=1")
    dim = int(out.shape[1])
    declared = getattr(obj, "dim", None)
    if isinstance(declared, int) and declared != dim:
        raise ValueError(f"{kind} encoder {source}: declares dim {declared} but returns {dim}")
    if expect is not None and dim != expect:
        raise ValueError(
            f"{kind} encoder {source}: its embeddings have {dim} dims"
            + (f" (declared output size {declared})" if declared is not None else "")
            + f"; expected {expect}"
        )
    return dim


# ---------------------------------------------------------------------------------------------
# manifest and shards


def _fingerprint(m: dict) -> str:
    key = {k: m[k] for k in ("split", "images", "image_list_sha256", "image_size", "shard_size")}
    key["tokens_per_image"] = m["tokens_per_image"]
    key["encoders"] = {name: _strip(e) for name, e in m["encoders"].items()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _strip(ident: dict | None) -> dict | None:
    """An encoder's identity without its path (what the fingerprint compares)."""
    return None if ident is None else {k: v for k, v in ident.items() if k != "source"}


def _differences(old: dict, new: dict) -> list[str]:
    if old.get("format") != FORMAT:
        return [f"it is not a {FORMAT} manifest"]
    out = []
    for k in ("split", "images", "image_list_sha256", "image_size", "shard_size"):
        if old.get(k) != new[k]:
            what = "image list" if k == "image_list_sha256" else k.replace("_", " ")
            out.append(f"{what} {old.get(k)} (now {new[k]})")
    for name, e in new["encoders"].items():
        o = (old.get("encoders") or {}).get(name)
        if _strip(o) == _strip(e):
            continue
        if o is None or e is None:
            out.append(
                f"{name} {'not cached' if o is None else 'cached'} (now "
                f"{'asked for' if o is None else 'not given'})"
            )
        else:
            out.append(
                f"{name} encoder {o.get('source') or o.get('class')} (weights "
                f"{str(o.get('weights_sha256'))[:12]}, dim {o.get('dim')}) differs from the one "
                f"given ({e.get('source') or e.get('class')}, weights "
                f"{str(e.get('weights_sha256'))[:12]}, dim {e.get('dim')})"
            )
    return out


def _shard_ok(path: Path, m: dict, i: int) -> bool:
    """The shard is whole and belongs to manifest ``m``: keys, dtypes, shapes, index range and
    fingerprint."""
    start = i * m["shard_size"]
    n = min(m["shard_size"], m["images"] - start)
    dims = {"codes": m["tokens_per_image"], "index": None}
    for name in ("clip", "face"):
        if m["encoders"][name] is not None:
            dims[name] = m["encoders"][name]["dim"]
    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("fingerprint") != m["fingerprint"]:
                return False
            if set(f.keys()) != set(dims):
                return False
            for k, d in dims.items():
                s = f.get_slice(k)
                if s.get_dtype() != _DTYPES[k] or s.get_shape() != ([n] if d is None else [n, d]):
                    return False
            return torch.equal(f.get_tensor("index"), torch.arange(start, start + n))
    except Exception:  # unreadable or truncated: written again
        return False


# ---------------------------------------------------------------------------------------------
# building


def build_features(
    dataset_root,
    out_dir,
    *,
    magvit,
    clip=None,
    face=None,
    split: str = "train",
    image_size: int = 256,
    shard_size: int = 256,
    batch_size: int = 16,
    progress: bool = True,
    expect_clip_dim: int | None = None,
    expect_face_dim: int | None = None,
    force: bool = False,
    device: str | None = None,
    workers: int = 0,
    on_shard: Callable[[int], None] | None = None,
) -> dict:
    """Encode every image of split ``split`` of the UniF²aceD-1M folder ``dataset_root`` once,
    into the cache folder ``out_dir`` (layout and resuming: the module docstring).

    ``magvit``: a MAGVIT-v2 folder or a loaded :class:`~unif2ace.vq.magvitv2.MagvitV2` (whose
    device and dtype are used). ``clip``: a CLIP vision folder
    (:class:`~unif2ace.encoders.adapters.ClipVisionAdapter`) or an object with ``.embed(images)
    -> [N, D]`` and ``.dim``; ``face``: a face ONNX file
    (:class:`~unif2ace.encoders.adapters.OnnxFaceAdapter`, 112×112 input) or such an object;
    None: not cached. ``expect_clip_dim`` / ``expect_face_dim``: refuse encoders of another
    embedding size. ``device``: where models loaded from paths run (default cuda when there is
    one). ``workers``: threads that decode a batch's images (0: in this thread). ``on_shard(i)``
    is called after shard ``i`` is written.

    Returns a summary: ``out``, ``split``, ``images``, ``shards``, ``written``, ``skipped``,
    ``tokens_per_image``, ``clip_dim``, ``face_dim``, ``seconds``, ``complete``."""
    t0 = time.perf_counter()
    for name, v in (
        ("image_size", image_size),
        ("shard_size", shard_size),
        ("batch_size", batch_size),
    ):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    out = Path(out_dir)
    # everything is read and checked before the output folder is touched
    data = read_unif2aced(dataset_root, split)
    model, mv_id = _load_magvit(magvit, device)
    d = mv_id["downsample"]
    if image_size % d:
        raise ValueError(
            f"image_size must be a multiple of {d} (MAGVIT-v2's ×{d} down), got {image_size}"
        )
    mv_id["dim"] = None
    encoders: dict[str, object] = {}
    ids: dict[str, dict | None] = {"magvit": mv_id, "clip": None, "face": None}
    for kind, spec, expect in (
        ("clip", clip, expect_clip_dim),
        ("face", face, expect_face_dim),
    ):
        if spec is None:
            continue
        obj, ident = _load_embedder(kind, spec, device)
        where = ident["source"] or ident["class"]
        if kind == "face":
            check_face_input(obj, where)
        ident["dim"] = _probe_dim(obj, kind, where, image_size, expect)
        encoders[kind], ids[kind] = obj, ident
    n = len(data)
    m = {
        "format": FORMAT,
        "version": VERSION,
        "dataset_root": str(Path(dataset_root).resolve()),
        "split": split,
        "images": n,
        "image_list_sha256": image_list_sha256(data),
        "image_size": image_size,
        "tokens_per_image": (image_size // d) ** 2,
        "shard_size": shard_size,
        "shards": -(-n // shard_size),
        "encoders": ids,
        "complete": False,
    }
    m["fingerprint"] = _fingerprint(m)
    with lock_folder(out, "tokenize-images"):
        _prepare_folder(out, m, force)
        atomic_write_json(out / MANIFEST, m)
        written = skipped = 0
        bar = tqdm(total=n, desc=f"tokenize {split}", unit="img", disable=not progress)
        pool = ThreadPoolExecutor(workers) if workers > 0 else None
        try:
            for i in range(m["shards"]):
                start, stop = i * shard_size, min(n, (i + 1) * shard_size)
                path = out / shard_name(i)
                if _shard_ok(path, m, i):
                    skipped += 1
                    bar.update(stop - start)
                    continue
                tensors = _encode_shard(
                    data, range(start, stop), model, encoders, m, batch_size, pool, bar
                )
                meta = {"fingerprint": m["fingerprint"], "shard": str(i), "format": FORMAT}
                atomic_write_bytes(path, save(tensors, metadata=meta))
                written += 1
                if on_shard is not None:
                    on_shard(i)
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown()
        m["complete"] = True
        atomic_write_json(out / MANIFEST, m)
    return {
        "out": str(out),
        "split": split,
        "images": n,
        "shards": m["shards"],
        "written": written,
        "skipped": skipped,
        "tokens_per_image": m["tokens_per_image"],
        "clip_dim": ids["clip"]["dim"] if ids["clip"] else None,
        "face_dim": ids["face"]["dim"] if ids["face"] else None,
        "seconds": round(time.perf_counter() - t0, 2),
        "complete": True,
    }


def _prepare_folder(out: Path, m: dict, force: bool) -> None:
    """Remove half-written temp files; refuse (or, with ``force``, clear) a cache of another
    setup."""
    for tmp in [*out.glob("shard_*.safetensors.tmp.*"), *out.glob(f"{MANIFEST}.tmp.*")]:
        tmp.unlink(missing_ok=True)
    mpath = out / MANIFEST
    shards = sorted(out.glob("shard_*.safetensors"))
    if force:
        for p in shards:
            p.unlink()
        mpath.unlink(missing_ok=True)
        return
    if mpath.is_file():
        try:
            old = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(
                f"{mpath} is not readable JSON ({e}); use force=True (--force) to start over"
            ) from None
        if not isinstance(old, dict):
            old = {}
        if old.get("fingerprint") != m["fingerprint"]:
            diffs = _differences(old, m) or ["its fingerprint"]
            raise ValueError(
                f"{out} holds features made otherwise: {'; '.join(diffs)}. Use another output "
                "folder, or force=True (--force) to delete them and start over"
            )
    elif shards:  # shards without a manifest: kept only if they are this setup's
        ours = {shard_name(i): i for i in range(m["shards"])}
        foreign = [
            p.name for p in shards if p.name not in ours or not _shard_ok(p, m, ours[p.name])
        ]
        if foreign:
            raise ValueError(
                f"{out} holds shards without a {MANIFEST} that this setup did not write (e.g. "
                f"{foreign[0]}); use another output folder, or force=True (--force) to delete "
                "them"
            )


def _load_pixels(data: UniF2aceData, i: int, size: int) -> torch.Tensor:
    img = load_image(str(data.path(i)), where=f"image {i} of {data.root}")
    return preprocess_image(img, size)


@torch.no_grad()
def _encode_shard(data, indices, model, encoders, m, batch_size, pool, bar) -> dict:
    dev = next(model.parameters()).device
    size, n_tok = m["image_size"], m["tokens_per_image"]
    codes, embs = [], {k: [] for k in encoders}
    idx = list(indices)
    for b in range(0, len(idx), batch_size):
        chunk = idx[b : b + batch_size]
        load = lambda i: _load_pixels(data, i, size)  # noqa: E731
        x = torch.cat(list(pool.map(load, chunk)) if pool is not None else [load(i) for i in chunk])
        c = model.get_code(x.to(dev, model.dtype)).cpu()
        if c.shape != (len(chunk), n_tok):
            raise ValueError(
                f"MAGVIT-v2 returned codes {tuple(c.shape)}, expected {(len(chunk), n_tok)}"
            )
        codes.append(c.to(torch.int16))
        for k, enc in encoders.items():
            e = enc.embed(x)
            e = (e if torch.is_tensor(e) else torch.as_tensor(e)).detach().float().cpu()
            dim = m["encoders"][k]["dim"]
            if e.shape != (len(chunk), dim) or not torch.isfinite(e).all():
                raise ValueError(
                    f"{k} encoder returned {tuple(e.shape)} (finite: "
                    f"{bool(torch.isfinite(e).all())}), expected {(len(chunk), dim)}"
                )
            embs[k].append(e)
        bar.update(len(chunk))
    out = {"codes": torch.cat(codes), "index": torch.tensor(idx, dtype=torch.int64)}
    out.update({k: torch.cat(v) for k, v in embs.items()})
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# reading


class FeatureCache:
    """A complete feature cache, read into memory: ``codes`` ``int16 [N, T]`` (image order),
    ``clip`` / ``face`` ``float32 [N, D]`` or None, ``manifest``. Every shard is checked against
    the manifest as it is read; an incomplete cache is refused."""

    def __init__(self, out_dir):
        self.folder = out = Path(out_dir)
        mpath = out / MANIFEST
        if not mpath.is_file():
            raise FileNotFoundError(
                f"{mpath} not found: {out} is not a feature cache (make one with "
                "`unif2ace tokenize-images`)"
            )
        try:
            m = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{mpath} is not readable JSON ({e})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise ValueError(f"{mpath} is not a {FORMAT} manifest")
        with lock_folder(out, "read features", shared=True):
            if not m.get("complete"):
                done = sum(_shard_ok(out / shard_name(i), m, i) for i in range(m["shards"]))
                raise ValueError(
                    f"{out}: the feature cache is incomplete ({done} of {m['shards']} shards "
                    "written); run tokenize-images again to finish it"
                )
            parts = []
            for i in range(m["shards"]):
                path = out / shard_name(i)
                if not _shard_ok(path, m, i):
                    raise ValueError(
                        f"{path} is missing or does not match {mpath} (keys, shapes, index "
                        "range or fingerprint); run tokenize-images again to rebuild it"
                    )
                parts.append(load_file(str(path)))
        self.manifest = m
        self.codes = torch.cat([p["codes"] for p in parts])
        self.index = torch.cat([p["index"] for p in parts])
        self.clip = torch.cat([p["clip"] for p in parts]) if "clip" in parts[0] else None
        self.face = torch.cat([p["face"] for p in parts]) if "face" in parts[0] else None

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    @property
    def tokens_per_image(self) -> int:
        return int(self.manifest["tokens_per_image"])

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    def check(self, dataset_root) -> UniF2aceData:
        """Read the dataset's split and check that this cache was made from its image list
        (same images, in the same order, of the same file sizes); returns the split's data."""
        m = self.manifest
        data = read_unif2aced(dataset_root, m["split"])
        h = image_list_sha256(data)
        if len(data) != m["images"] or h != m["image_list_sha256"]:
            raise ValueError(
                f"the feature cache {self.folder} was made from another image list "
                f"({m['images']} images, hash {m['image_list_sha256'][:12]}) than split "
                f"{m['split']!r} of {dataset_root} ({len(data)} images, hash {h[:12]}); run "
                "tokenize-images for this dataset"
            )
        return data
