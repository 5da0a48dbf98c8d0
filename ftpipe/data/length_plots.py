"""The token-length histograms of the tokenized splits (metrics/plots/token_lengths.{csv,png}): their
bins, the CSV text of the histogram rows (one row per bin, one column per split: `dvc plots show` draws
it) and a PNG with one histogram per split and a line at max_seq_length.
"""
from __future__ import annotations

import csv
import io

# Histogram bins across 0..max_seq_length: 8 tokens wide at the default max_seq_length of 256.
HISTOGRAM_BINS = 32


def histogram_csv(rows: list[dict[str, int]]) -> str:
    """CSV text of the rows, with a header of the first row's keys."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def histogram_png(lengths: dict[str, list[int]], max_seq_length: int) -> bytes:
    """One histogram per split (tokens per example), each with a line at max_seq_length."""
    import matplotlib

    matplotlib.use("Agg")   # no display: render to a file
    import matplotlib.pyplot as plt
    import numpy as np

    edges = np.linspace(0, max_seq_length, HISTOGRAM_BINS + 1)
    figure, axes = plt.subplots(len(lengths), 1, sharex=True, figsize=(7, 2.2 * len(lengths)), squeeze=False)
    for axis, (split, values) in zip(axes[:, 0], lengths.items()):
        axis.hist(values, bins=edges, color="tab:blue")
        axis.axvline(max_seq_length, color="tab:red", linestyle="--", label=f"max_seq_length {max_seq_length}")
        axis.set_title(f"{split}: {len(values)} examples, mean {np.mean(values) if values else 0:.1f} tokens",
                       fontsize=10)
        axis.set_ylabel("examples")
        axis.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("tokens per example")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
