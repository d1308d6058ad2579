"""The image tokenizer: LFQ/FSQ autoencoder, 64 px -> 8×8 tokens (see :mod:`unif2ace.vq.model`)."""

from unif2ace.vq.model import VQAutoencoder, VQConfig
from unif2ace.vq.train import evaluate_vq, reconstruct, train_vq

__all__ = ["VQAutoencoder", "VQConfig", "evaluate_vq", "reconstruct", "train_vq"]
