"""Model adapters: LLaDA, Dream and the embedded tiny model as one `DiffusionLM` interface (see base.py)."""

from .base import DiffusionLM, merge_adapter
from .loading import load
from .tiny import build_tiny, build_tokenizer

__all__ = ["DiffusionLM", "load", "merge_adapter", "build_tiny", "build_tokenizer"]
