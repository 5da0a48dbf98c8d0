"""MinHash + LSH finds near-duplicates, keeps the first copy, and is deterministic."""
import random

import numpy as np

from ftpipe.data.near_dup import NearDuplicateIndex, deduplicate, find_contaminated, normalize, shingles


def _text(rng: random.Random, n: int = 40) -> str:
    return " ".join(f"w{rng.randrange(5000)}" for _ in range(n))


def _edit(rng: random.Random, text: str, changes: int) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), changes):
        words[i] = f"x{rng.randrange(10**6)}"
    return " ".join(words)


BASE = ("The quick brown fox jumps over the lazy dog while the farmer watches from the "
        "porch and drinks his coffee slowly before heading out to the fields to check "
        "on the corn and the wheat he planted early last spring")


def test_normalize_and_shingles():
    assert normalize("  Don't   STOP, now!\n") == "dont stop now"
    assert shingles("a b", 3) == {"a b"}
    assert shingles("A, b c d") == {"a b c", "b c d"}


def test_identical_texts_found():
    index = NearDuplicateIndex(0.8)
    index.add("a", BASE)
    assert index.query(BASE) == [("a", 1.0)]
    assert index.query(BASE.upper() + "!!") == [("a", 1.0)]   # normalization


def test_one_word_edit_found_unrelated_not():
    assert len(BASE.split()) == 40
    index = NearDuplicateIndex(0.8)
    index.add("a", BASE)
    index.add("b", _text(random.Random(1)))
    matches = index.query(BASE.replace("coffee", "tea"))
    assert [k for k, _ in matches] == ["a"] and matches[0][1] >= 0.8
    assert index.query(_text(random.Random(2))) == []


def test_deterministic_across_instances():
    texts = [_text(random.Random(i)) for i in range(5)]
    one, two = NearDuplicateIndex(0.8), NearDuplicateIndex(0.8)
    assert np.array_equal(one.signatures(texts), two.signatures(texts))
    assert deduplicate(enumerate_items(texts + texts), 0.8) == deduplicate(enumerate_items(texts + texts), 0.8)


def enumerate_items(texts):
    return [(f"k{i}", t) for i, t in enumerate(texts)]


def test_deduplicate_keeps_first_and_maps_dropped():
    other = _text(random.Random(3))
    items = [("first", BASE), ("other", other), ("copy", BASE.replace("coffee", "tea")),
             ("exact", BASE), ("other2", other + ".")]
    kept, dropped = deduplicate(items, 0.8)
    assert kept == ["first", "other"]
    assert {key: match for key, (match, _) in dropped.items()} == {"copy": "first", "exact": "first", "other2": "other"}
    # The exact Jaccard: one word of 40 changed replaces 3 of 38 shingles -> 35 / 41.
    assert dropped["copy"][1] == round(35 / 41, 4) and dropped["exact"][1] == 1.0


def test_find_contaminated():
    rng = random.Random(4)
    train = [(f"t{i}", _text(rng)) for i in range(50)]
    test = [(f"q{i}", _text(rng)) for i in range(20)]
    train.append(("leak", _edit(rng, test[7][1], 1)))
    found = find_contaminated(train, test, 0.8)
    assert list(found) == ["leak"] and found["leak"][0] == "q7" and found["leak"][1] >= 0.8


def test_short_texts():
    index = NearDuplicateIndex(0.8)
    index.add("hi", "Hello there")
    index.add("empty", "")
    assert index.query("hello, THERE!") == [("hi", 1.0)]
    assert index.query("hello world") == []
    assert index.query("  ") == [("empty", 1.0)]


def test_duplicate_key_rejected():
    index = NearDuplicateIndex(0.8)
    index.add("a", "x y z")
    try:
        index.add("a", "x y z")
    except ValueError:
        return
    raise AssertionError("expected ValueError")


def test_planted_recall_small_scale():
    rng = random.Random(5)
    originals = [_text(rng) for _ in range(1900)]
    planted = {}
    items = [(f"o{i}", t) for i, t in enumerate(originals)]
    for j, i in enumerate(rng.sample(range(len(originals)), 100)):
        items.append((f"p{j}", _edit(rng, originals[i], 1)))
        planted[f"p{j}"] = f"o{i}"
    # A 1-word edit of 40 words leaves Jaccard 35/41 = 0.85 (3 of 38 shingles change, fewer when
    # the word is near an end). Verification is exact, so only LSH banding can miss a pair: at
    # threshold 0.8 (b=16, r=8) a pair at 0.85 becomes a candidate 99.4% of the time.
    for threshold in (0.8, 0.7):
        kept, dropped = deduplicate(items, threshold)
        found = sum(dropped.get(k, ("",))[0] == v for k, v in planted.items())
        assert found / len(planted) >= 0.97, threshold
        assert set(dropped) <= set(planted)               # no false pairs among unrelated texts
        assert all(dropped[k][0] == planted[k] and dropped[k][1] >= threshold for k in dropped)


def test_find_contaminated_equals_brute_force():
    """The prefix-filter join is exact: the same pairs as comparing every pair, including pairs
    exactly at the threshold (0.7 of 10 shingles: the floating-point ceiling case)."""
    rng = random.Random(8)
    words = [f"v{i}" for i in range(30)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randrange(1, 14))) for _ in range(120)]
    for i in range(0, 120, 3):   # plant close variants
        t = texts[i].split()
        t[rng.randrange(len(t))] = rng.choice(words)
        texts[i + 1] = " ".join(t)
    train = [(f"t{i}", t) for i, t in enumerate(texts[:80])]
    test = [(f"q{i}", t) for i, t in enumerate(texts[80:])]
    for threshold in (0.5, 0.7, 0.8, 1.0):
        expected = {}
        for key, text in train:
            best = None
            for other_key, other in test:
                a, b = shingles(text), shingles(other)
                similarity = len(a & b) / len(a | b)
                if similarity >= threshold and (best is None or similarity > best[1]):
                    best = (other_key, round(similarity, 4))
            if best:
                expected[key] = best
        assert find_contaminated(train, test, threshold) == expected, threshold
        assert threshold < 1.0 or all(s == 1.0 for _, s in expected.values())
    exact = [("a", "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12")]   # 10 shingles
    edited = [("b", "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13")]   # 11 shingles, 10 shared
    assert find_contaminated(edited, exact, 10 / 11) == {"b": ("a", round(10 / 11, 4))}
