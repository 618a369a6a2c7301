"""Training data: pretraining token shards (pretrain.py); SFT examples come next to it."""

from camelid.data.pretrain import DataError, TokenData, prepare, read_meta, token_dtype, window_starts

__all__ = ["DataError", "TokenData", "prepare", "read_meta", "token_dtype", "window_starts"]
