"""ftpipe.data.packing: best-fit decreasing packing of examples into rows, the packed columns (position ids
restarting per example, each example's first label masked) and the padding shares."""
import pytest

from ftpipe.data.packing import pack_examples, packed_rows, padding_stats
from ftpipe.model.modeling import IGNORE_INDEX


def test_pack_examples_fills_rows_best_fit_decreasing():
    #            a  b  c  d  e: longest first, each into the fullest row it fits: [a, c] and [b, d, e]
    lengths = [6, 5, 4, 3, 2]
    bins = pack_examples(lengths, ["a", "b", "c", "d", "e"], capacity=10)
    assert bins == [[0, 2], [1, 3, 4]]
    # Equal lengths go by id: the order of the input does not matter.
    assert pack_examples([4, 4, 4], ["z", "x", "y"], capacity=8) == [[1, 2], [0]]
    with pytest.raises(ValueError, match="'b' has 11 tokens, more than a row's 10"):
        pack_examples([3, 11], ["a", "b"], capacity=10)


def test_pack_examples_is_a_partition_independent_of_input_order():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    ids = [f"id{index:03d}" for index in range(500)]
    bins = pack_examples(lengths, ids, capacity=128)
    assert sorted(index for members in bins for index in members) == list(range(500))
    assert all(sum(lengths[index] for index in members) <= 128 for members in bins)
    assert len(bins) <= sum(lengths) / 128 * 1.05 + 1   # within 5% of the no-padding bound on these lengths

    order = list(range(500))
    rng.shuffle(order)
    shuffled = pack_examples([lengths[index] for index in order], [ids[index] for index in order], capacity=128)
    assert [[ids[order[index]] for index in members] for members in shuffled] == \
        [[ids[index] for index in members] for members in bins]



def test_packed_rows_concatenate_examples_with_restarting_positions_and_masked_first_labels():
    import numpy as np

    examples = [{"id": "a", "input_ids": np.array([5, 6, 7]), "labels": np.array([5, 6, 7])},
                {"id": "b", "input_ids": np.array([8, 9]), "labels": np.array([IGNORE_INDEX, 9])},
                {"id": "c", "input_ids": np.array([4]), "labels": np.array([4])}]
    columns = packed_rows(examples, [[0, 1], [2]])
    assert columns["ids"] == [["a", "b"], ["c"]]
    assert [row.tolist() for row in columns["input_ids"]] == [[5, 6, 7, 8, 9], [4]]
    assert [row.tolist() for row in columns["position_ids"]] == [[0, 1, 2, 0, 1], [0]]
    assert [row.tolist() for row in columns["labels"]] == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9], [IGNORE_INDEX]]
    assert examples[0]["labels"].tolist() == [5, 6, 7]   # the examples themselves are left as they were


def test_padding_stats_compare_one_example_per_row_with_packed_rows():
    assert padding_stats(tokens=150, examples=4, packed=2, max_seq_length=100) == {
        "padding_share_unpacked": 0.625, "padding_share_packed": 0.25, "packed_rows": 2}
