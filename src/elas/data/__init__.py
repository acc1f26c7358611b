"""Data: sources (sources.py) -> tokenizer (tokenizer.py) -> packed token files (prepare.py) -> batches (loader.py)."""
from .loader import Batches, TokenWindows, check_token_range, load_meta
from .prepare import DataError, prepare

__all__ = ["prepare", "DataError", "load_meta", "check_token_range", "TokenWindows", "Batches"]
