"""Near-duplicate detection: MinHash over word shingles, LSH banding, then verification.

Exact-duplicate removal misses the copies that matter most: the same answer with a typo
fixed, or a benchmark question pasted into the training set with one word changed. Two
texts are near-duplicates when the Jaccard similarity of their word-shingle sets is at
least `threshold`. MinHash estimates that similarity from fixed-size signatures; LSH
banding finds candidate pairs without comparing every pair; every candidate is then
verified with its estimated similarity, so an LSH collision alone never drops a row.

Deterministic: the hash functions come from a fixed seed and shingles are hashed with
zlib.crc32 (Python's hash() is salted per process), so the same inputs give the same
decisions on every machine and every run.
"""
from __future__ import annotations

import re
import zlib
from typing import Iterable, Sequence

import numpy as np

SEED = 20240601
# A prime just above 2**32: shingle hashes (crc32) and the coefficients a, b are < 2**32,
# so a*x + b < 2**64 and the universal hash (a*x + b) mod P is exact in uint64.
PRIME = np.uint64(4294967311)
BATCH_TEXTS = 1000   # signatures computed 1000 texts at a time: ~40k shingles x 128 perms x 8 B = 40 MB
_PUNCT = re.compile(r"[^\w\s]+")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lowercase, delete punctuation (so "don't" == "dont"), collapse whitespace."""
    return _SPACE.sub(" ", _PUNCT.sub("", text.lower())).strip()


def shingles(text: str, size: int = 3) -> set[str]:
    """Word `size`-grams of the normalized text; a shorter text is one shingle by itself."""
    words = normalize(text).split(" ")
    if len(words) < size:
        return {" ".join(words)}
    return {" ".join(words[i:i + size]) for i in range(len(words) - size + 1)}


def choose_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """Bands b and rows r (b*r <= num_perm) for the LSH S-curve P(candidate) = 1-(1-s^r)^b.

    The curve should rise steeply around `threshold`. We minimise the area of false
    positives below the threshold plus the area of false negatives above it, weighting
    misses 19:1 (0.95 vs 0.05): a false candidate only costs one signature comparison
    (verification rejects it), a miss is a duplicate that stays in the data. For
    threshold 0.8 and 128 permutations this gives b=16, r=8: a pair at Jaccard 0.8 becomes
    a candidate 95% of the time, at 0.85 99.4%, at 0.5 6% (then rejected), at 0.2 ~0%.
    """
    best, best_cost = (1, num_perm), float("inf")
    s_low = np.linspace(0.0, threshold, 201)
    s_high = np.linspace(threshold, 1.0, 201)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _area(1 - (1 - s_low ** r) ** b, s_low)
            fn = _area((1 - s_high ** r) ** b, s_high)
            cost = 0.05 * fp + 0.95 * fn
            if cost < best_cost:
                best, best_cost = (b, r), cost
    return best


def _area(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoid rule (np.trapz is renamed across numpy versions)."""
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


class NearDuplicateIndex:
    """Keys with MinHash signatures, bucketed by LSH band; query() returns verified matches."""

    def __init__(self, threshold: float, num_perm: int = 128, shingle: int = 3):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold, self.num_perm, self.shingle = threshold, num_perm, shingle
        self.bands, self.rows = choose_bands(threshold, num_perm)
        rng = np.random.default_rng(SEED)
        self._a = rng.integers(1, 2 ** 32, size=num_perm, dtype=np.uint64)[:, None]
        self._b = rng.integers(0, 2 ** 32, size=num_perm, dtype=np.uint64)[:, None]
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self._keys: list[str] = []
        self._sigs: list[np.ndarray] = []
        self._known: set[str] = set()

    def __len__(self) -> int:
        return len(self._keys)

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """MinHash signatures, one row (num_perm uint64) per text, computed in batches."""
        out = np.empty((len(texts), self.num_perm), dtype=np.uint64)
        for lo in range(0, len(texts), BATCH_TEXTS):
            hashes, starts = [], []
            for text in texts[lo:lo + BATCH_TEXTS]:
                starts.append(len(hashes))
                hashes.extend(zlib.crc32(s.encode("utf-8")) for s in shingles(text, self.shingle))
            x = np.asarray(hashes, dtype=np.uint64)[None, :]
            permuted = (self._a * x + self._b) % PRIME          # (num_perm, all shingles of the batch)
            out[lo:lo + len(starts)] = np.minimum.reduceat(permuted, starts, axis=1).T
        return out

    def add(self, key: str, text: str) -> None:
        self._add_signature(key, self.signatures([text])[0])

    def query(self, text: str) -> list[tuple[str, float]]:
        """Indexed keys whose estimated Jaccard with `text` is >= threshold, most similar first."""
        return self._query_signature(self.signatures([text])[0])

    def _add_signature(self, key: str, sig: np.ndarray) -> None:
        if key in self._known:
            raise ValueError(f"key {key!r} is already in the index")
        self._known.add(key)
        idx = len(self._keys)
        self._keys.append(key)
        self._sigs.append(sig)
        for band, bucket in zip(self._bands(sig), self._buckets):
            bucket.setdefault(band, []).append(idx)

    def _query_signature(self, sig: np.ndarray) -> list[tuple[str, float]]:
        candidates: set[int] = set()
        for band, bucket in zip(self._bands(sig), self._buckets):
            candidates.update(bucket.get(band, ()))
        matches = []
        for idx in sorted(candidates):
            similarity = float(np.count_nonzero(self._sigs[idx] == sig)) / self.num_perm
            if similarity >= self.threshold:
                matches.append((self._keys[idx], similarity))
        matches.sort(key=lambda m: -m[1])   # stable: ties stay in insertion order
        return matches

    def _bands(self, sig: np.ndarray) -> list[bytes]:
        r = self.rows
        return [sig[i * r:(i + 1) * r].tobytes() for i in range(self.bands)]


def deduplicate(items: Iterable[tuple[str, str]], threshold: float, num_perm: int = 128,
                shingle: int = 3) -> tuple[list[str], dict[str, str]]:
    """Keep the first of each group of near-duplicates.

    Returns (kept keys in input order, {dropped key: the kept key it duplicates}). A row is
    compared with kept rows only, so a chain a~b~c where a and c differ keeps c.
    """
    items = list(items)
    index = NearDuplicateIndex(threshold, num_perm, shingle)
    sigs = index.signatures([text for _, text in items])
    kept, dropped = [], {}
    for (key, _), sig in zip(items, sigs):
        matches = index._query_signature(sig)
        if matches:
            dropped[key] = matches[0][0]
        else:
            index._add_signature(key, sig)
            kept.append(key)
    return kept, dropped


def find_contaminated(train: Iterable[tuple[str, str]], test: Iterable[tuple[str, str]],
                      threshold: float, num_perm: int = 128, shingle: int = 3) -> dict[str, str]:
    """{test key: most similar train key} for every test example that near-duplicates training data."""
    train, test = list(train), list(test)
    index = NearDuplicateIndex(threshold, num_perm, shingle)
    for (key, _), sig in zip(train, index.signatures([text for _, text in train])):
        index._add_signature(key, sig)
    found = {}
    for (key, _), sig in zip(test, index.signatures([text for _, text in test])):
        matches = index._query_signature(sig)
        if matches:
            found[key] = matches[0][0]
    return found
