"""The image tokenizer: LFQ/FSQ autoencoder, 64 px -> 8×8 tokens (see :mod:`unif2ace.vq.model`)."""

from unif2ace.vq.magvitv2 import MagvitV2, load_magvitv2
from unif2ace.vq.model import VQAutoencoder, VQConfig
from unif2ace.vq.train import evaluate_vq, reconstruct, train_vq

__all__ = [
    "MagvitV2",
    "VQAutoencoder",
    "VQConfig",
    "evaluate_vq",
    "load_magvitv2",
    "reconstruct",
    "train_vq",
]
