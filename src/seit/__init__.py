"""seit: train vision models on VQ tokens instead of pixels."""

__version__ = "0.1.0"
