"""otcclip: CLIP pre-training that survives poisoned image-caption data.

Captions are re-assigned by an optimal-transport distance between an image's
patch tokens and a caption's word tokens (OTCCLIP, EMNLP 2025); pruning and
assignment run in the Rust engine `otmatch`, scoring and training in PyTorch.
"""

__version__ = "0.1.0"
