"""Reading the tokenize stage's output. Its own module, so that the stages reading it (train, evaluate,
merge, quantize) depend on this reader alone, not on stages/tokenize.py: editing how tokenize draws
its histograms reruns no training."""
from __future__ import annotations

from pathlib import Path

from ftpipe.core.errors import PipelineError
from ftpipe.core.paths import TOKENIZED_DIR


def load_tokenized(split: str, folder: Path = TOKENIZED_DIR) -> list[dict]:
    """The rows of one tokenized split: one example per row ({id, input_ids, labels}), or packed train
    rows ({ids, input_ids, labels, position_ids}) when tokenize.packing is on."""
    import pyarrow.parquet as pq

    path = Path(folder) / f"{split}.parquet"
    if not path.exists():
        raise PipelineError(f"{path}: not found. Run `dvc repro tokenize` first.")
    return pq.read_table(path).to_pylist()
