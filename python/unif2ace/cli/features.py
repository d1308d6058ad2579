"""``unif2ace tokenize-images``: a UniF²aceD-1M split encoded once into ``<out>/features/<split>/``
(MAGVIT-v2 codes, and CLIP / face-identity embeddings when their models are given) before
fine-tuning from Show-o; :mod:`unif2ace.pipeline.features` does the work. Rerunning the same
command after a kill resumes: finished shards are kept."""

from __future__ import annotations

import math
from pathlib import Path

from unif2ace.cli._common import Commands, nonneg_int, pos_int
from unif2ace.io import lock_folder

COMMANDS = Commands()


@COMMANDS.register(
    "tokenize-images",
    "encode a UniF2aceD-1M split once (MAGVIT-v2 codes, CLIP and face embeddings) into "
    "<out>/features/<split>/; rerun to resume",
)
def _add_tokenize(p):
    p.add_argument("--data", type=Path, required=True, help="UniF2aceD-1M folder")
    p.add_argument(
        "--magvit", type=Path, help="MAGVIT-v2 folder (default: the run's, after `init`)"
    )
    p.add_argument("--clip", type=Path, help="CLIP vision folder (its embeddings are cached)")
    p.add_argument(
        "--face-onnx", type=Path, help="face-recognition ONNX, 112x112 input (e.g. glintr100.onnx)"
    )
    p.add_argument("--split", default="train", help="train (default), test, val...")
    p.add_argument(
        "--image-size", type=pos_int, help="pixels (default: the run's model's, else 256)"
    )
    p.add_argument("--shard-size", type=pos_int, default=256, help="images per shard (256)")
    p.add_argument("--batch-size", type=pos_int, default=16, help="images per batch (16)")
    p.add_argument(
        "--workers", type=nonneg_int, default=0, help="image-decoding threads (default 0)"
    )
    p.add_argument("--device", help="cuda or cpu (default cuda when there is one)")
    p.add_argument("--expect-clip-dim", type=pos_int, help="refuse a CLIP of another size")
    p.add_argument("--expect-face-dim", type=pos_int, help="refuse a face model of another size")
    p.add_argument(
        "--force", action="store_true", help="delete a cache made otherwise and start over"
    )
    return _tokenize


def _run_defaults(args) -> None:
    """On a run made by ``unif2ace init --from-showo``: the encoders it was initialised with,
    and the embedding sizes its model takes, for every option left unset."""
    from unif2ace.pipeline.paper import init_config, is_paper_run, read_run

    if not is_paper_run(args.out):
        if args.magvit is None:
            raise ValueError("--magvit DIR is required (or --out a run made by `unif2ace init`)")
        args.image_size = args.image_size or 256
        return
    run, cfg = read_run(args.out), init_config(args.out)
    if args.image_size is None:  # MAGVIT-v2: one code per 16×16 pixels
        args.image_size = math.isqrt(cfg.image_tokens) * 16
    for opt, key in (("magvit", "magvit"), ("clip", "clip"), ("face_onnx", "face_onnx")):
        if getattr(args, opt) is None and run.get(key):
            setattr(args, opt, Path(run[key]))
    if args.expect_clip_dim is None and args.clip is not None:
        args.expect_clip_dim = cfg.semantic_dim
    if args.expect_face_dim is None and args.face_onnx is not None:
        args.expect_face_dim = cfg.identity_dim


def _tokenize(args) -> dict:
    from unif2ace.pipeline.features import build_features  # torch-heavy: only when run

    _run_defaults(args)

    with lock_folder(args.out, "tokenize-images"):
        return build_features(
            args.data,
            Path(args.out) / "features" / args.split,
            magvit=args.magvit,
            clip=args.clip,
            face=args.face_onnx,
            split=args.split,
            image_size=args.image_size,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            progress=not args.quiet,
            expect_clip_dim=args.expect_clip_dim,
            expect_face_dim=args.expect_face_dim,
            force=args.force,
            device=args.device,
            workers=args.workers,
        )
