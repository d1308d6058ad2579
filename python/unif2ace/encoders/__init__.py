"""Semantic (CLIP stand-in) and identity (AntelopeV2 stand-in) encoders for SynthFace, and adapters
for real encoders on local files (:mod:`unif2ace.encoders.adapters`, imported on demand: it needs
transformers / onnxruntime)."""

from unif2ace.encoders.cnn import (
    ArcFaceHead,
    IdentityEncoder,
    SemanticEncoder,
    load_encoder,
    to_tensor,
)
from unif2ace.encoders.train import (
    cache_embeddings,
    load_embeddings,
    train_identity,
    train_semantic,
    verification_auc,
)

__all__ = [
    "ArcFaceHead",
    "IdentityEncoder",
    "SemanticEncoder",
    "cache_embeddings",
    "load_embeddings",
    "load_encoder",
    "to_tensor",
    "train_identity",
    "train_semantic",
    "verification_auc",
]
