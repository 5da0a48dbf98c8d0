"""Writing rows of token ids to Parquet (the tokenize stage's splits; ftpipe.data.tokenized reads them):
token columns become Arrow list<int64> columns built from numpy arrays, without a Python int per token.
"""
from __future__ import annotations

from pathlib import Path

TOKEN_COLUMNS = ("input_ids", "labels", "position_ids")   # lists of token ids; other columns are plain values


def list_array(arrays: list):
    """An Arrow list<int64> column built from numpy arrays without a Python int per token."""
    import numpy as np
    import pyarrow as pa

    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(array) for array in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.int64, copy=False)))


def write_rows(path: Path, columns: dict[str, list]) -> None:
    """One Parquet file of `columns` (name -> one value per row); TOKEN_COLUMNS as list<int64> columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {name: list_array(values) if name in TOKEN_COLUMNS else pa.array(values)
              for name, values in columns.items()}
    pq.write_table(pa.table(arrays), path)
