"""stp: Spatio-Temporal Pruning for reinforcement learning of masked diffusion language models."""

__version__ = "0.1.0"
