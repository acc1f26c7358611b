"""Data: sources (sources.py) -> tokenizer (tokenizer.py) -> packed token files (prepare.py) -> batches (loader.py)."""
from .loader import Batches, TokenWindows, load_meta
from .prepare import DataError, prepare

__all__ = ["prepare", "DataError", "load_meta", "TokenWindows", "Batches"]
