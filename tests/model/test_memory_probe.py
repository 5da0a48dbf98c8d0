"""ftpipe/model/memory_probe.py: its probe steps need a CUDA GPU (measured on the H200 in
bench/results/gpu_train_plan.json, "memory_probe" of each stage job); what runs on the CPU is checked here."""
import warnings

from ftpipe.model.memory_probe import (
    busiest_layouts,
    layout_positions,
    random_rows,
    silence_unsloth_probe_warning,
)


def test_unsloths_warning_after_the_probe_is_silenced_and_no_other():
    # The text Unsloth 2026.10.9 warns with when training starts after a probe (unsloth/models/_utils.py)
    text = ("Unsloth: detected a manual forward/backward run before trainer.train(); reset the torch.compile graph "
            "cache it poisoned so training starts clean. To avoid this, run any pre-train probe under "
            "`with torch.no_grad():`.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_unsloth_probe_warning()
        warnings.warn(text)
        warnings.warn("Unsloth: some other warning")
    assert [str(w.message) for w in caught] == ["Unsloth: some other warning"]


def packed_row(lengths: list[int]) -> dict:
    return {"position_ids": [position for length in lengths for position in range(length)]}


def test_the_probe_copies_the_layout_of_the_rows_with_the_most_examples():
    rows = [packed_row([2048]), packed_row([1000, 1000, 48]), packed_row([500] * 4), packed_row([700, 700])]
    assert busiest_layouts(rows) == [[500] * 4, [1000, 1000, 48]]
    assert busiest_layouts(rows, 1) == [[500] * 4]


def test_a_probe_row_has_exactly_the_tokens_asked_for_its_examples_repeated_and_the_last_cut():
    assert layout_positions([3, 2], 7) == [0, 1, 2, 0, 1, 0, 1]
    assert layout_positions([4], 3) == [0, 1, 2]
    assert layout_positions([2048], 2048) == list(range(2048))


def test_random_probe_rows_take_the_layouts_in_turn():
    rows = random_rows(3, 6, 100, True, layouts=[[2, 4], [3, 3]])
    assert [row["position_ids"] for row in rows] == [[0, 1, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3]]
    assert all(row["labels"] == row["input_ids"] and len(row["input_ids"]) == 6 for row in rows)
    assert random_rows(1, 4, 100, True)[0]["position_ids"] == [0, 1, 2, 3]   # one example a row
    assert "position_ids" not in random_rows(1, 4, 100, False)[0]
