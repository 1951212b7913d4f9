"""A token file given as a setup's data: read and checked in full, once, by the case validator and
again by every rank that reads it."""

from __future__ import annotations

import numpy as np

from parity.core import files


class TokenFileError(ValueError):
    """A token file that cannot feed the model; the message says what is wrong with it."""


def load_token_file(path: str, seq_len: int, vocab: int) -> np.ndarray:
    """A 1-D integer array of at least seq_len + 1 ids in [0, vocab); checked in full, once, by the validator."""
    try:
        files.check_regular(path)  # numpy opens it itself: a FIFO would block it
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)  # never unpickle a data file
    except (OSError, ValueError, EOFError) as e:
        raise TokenFileError(f"{path} is not a readable .npy array ({type(e).__name__}: {e}); "
                             "allowed: a 1-D integer .npy array of token ids") from None
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        shape = getattr(tokens, "shape", "?")
        raise TokenFileError(f"{path} holds {getattr(tokens, 'dtype', type(tokens).__name__)} {shape}; "
                             "allowed: a 1-D integer array of token ids")
    if len(tokens) < seq_len + 1:
        raise TokenFileError(f"{path} has {len(tokens)} tokens; allowed: at least seq_len + 1 = {seq_len + 1}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab:
        raise TokenFileError(f"{path} has token ids from {low} to {high}; allowed: ids in [0, {vocab}) for this model")
    return np.asarray(tokens)
