"""Time ftpipe.data.pii and ftpipe.data.near_dup at 100,000 texts (not part of the test suite).

    .venv/bin/python bench/data_gate_libs.py

PII: find_pii over 100k ~300-character texts, 1 in 20 carrying an e-mail, card or key.
Near-dup: deduplicate 100k ~40-word texts of which 5% are planted copies of another text
with 1 or 2 words changed; reports recall on the planted pairs and precision of all drops.
"""
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ftpipe.data.near_dup import NearDuplicateIndex, deduplicate
from ftpipe.data.pii import find_pii

N = 100_000
SNIPPETS = ["def f(x):\n    return x * 0.5  # see PEP 8", "Python 3.11.7 released 2026-11-23 at 14:05",
            "MASK = 0x7fffffff; arr[::2]", "The model answers the question with a short summary.",
            "import numpy as np\nnp.linspace(0, 1, 201)", "ssh deploy@buildhost -p 2222"]
PII = ["mail jane.doe@example.com", "card 4111 1111 1111 1111", "key AKIAIOSFODNN7EXAMPLE",
       "call (555) 123-4567", "host 10.0.0.5"]


def bench_pii() -> None:
    rng = random.Random(0)
    texts = []
    for i in range(N):
        parts = [rng.choice(SNIPPETS) for _ in range(8)]
        if i % 20 == 0:
            parts[rng.randrange(4)] = rng.choice(PII)
        texts.append(" ".join(parts)[:300])
    start = time.perf_counter()
    flagged = sum(bool(find_pii(t)) for t in texts)
    took = time.perf_counter() - start
    print(f"pii: find_pii over {N} texts (mean {sum(map(len, texts)) / N:.0f} chars): {took:.2f} s, "
          f"{flagged} flagged (planted {N // 20})")


def bench_near_dup(threshold: float) -> None:
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(20_000)]
    n_planted = N // 20
    originals = [" ".join(rng.choices(vocab, k=40)) for _ in range(N - n_planted)]
    items = [(f"o{i}", t) for i, t in enumerate(originals)]
    planted = {}
    for j in range(n_planted):
        src = rng.randrange(len(originals))
        words = originals[src].split()
        for pos in rng.sample(range(40), rng.choice((1, 2))):
            words[pos] = f"x{rng.randrange(10**6)}"
        key = f"p{j}"
        items.append((key, " ".join(words)))   # after its source, so the source is the one kept
        planted[key] = f"o{src}"
    start = time.perf_counter()
    kept, dropped = deduplicate(items, threshold)
    took = time.perf_counter() - start
    hits = sum(dropped.get(k) == v for k, v in planted.items())
    correct = sum(planted.get(k) == v for k, v in dropped.items())
    bands = NearDuplicateIndex(threshold)
    print(f"near_dup: deduplicate {N} texts at threshold {threshold} (b={bands.bands}, r={bands.rows}): "
          f"{took:.1f} s; recall {hits / n_planted:.3f} ({hits}/{n_planted}), "
          f"precision {correct / max(len(dropped), 1):.3f} ({correct}/{len(dropped)})")


if __name__ == "__main__":
    bench_pii()
    for t in (0.7, 0.8):
        bench_near_dup(t)
