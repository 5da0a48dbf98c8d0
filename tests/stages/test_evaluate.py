"""Stage `evaluate`: ROUGE-L on known values, a stable example subset, and base vs tuned metrics
and side-by-side samples for the tiny model and its trained adapter."""
import math

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import read_jsonl
from ftpipe.core.params import EvaluateParams
from ftpipe.data.tokenized import load_tokenized
from stages.evaluate import evaluate_models, rouge_l, select_examples

PARAMS = EvaluateParams(max_examples=4, batch_size=2, max_new_tokens=8, num_samples=2)


@pytest.mark.parametrize("prediction, reference, expected", [
    ("the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("The CAT, sat!", "the cat sat", 1.0),                          # lowercase words, punctuation ignored
    ("dogs bark loudly", "the cat sat", 0.0),
    ("the cat sat on the mat", "the cat is on the mat", 5 / 6),    # LCS "the cat on the mat": P = R = 5/6
    ("a b c", "a x b y", 4 / 7),                                  # LCS 2: P = 2/3, R = 1/2, F1 = 4/7
    ("b a", "a b", 0.5),                                          # order matters: LCS 1
    ("", "the cat", 0.0),
    ("the cat", "?!", 0.0),
])
def test_rouge_l(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)


def rows(*ids: str) -> tuple[list[dict], list[dict]]:
    examples = [{"id": row_id, "messages": [{"role": "user", "content": row_id}]} for row_id in ids]
    return examples, [{"id": row_id, "input_ids": [len(row_id)], "labels": [0]} for row_id in ids]


def test_select_examples_is_stable_and_honours_max_examples():
    examples, tokenized = rows("c", "a", "d", "b")
    kept, kept_tokens = select_examples(examples, tokenized, 3)
    assert [e["id"] for e in kept] == [r["id"] for r in kept_tokens] == ["a", "b", "c"]
    again, _ = select_examples(list(reversed(examples)), list(reversed(tokenized)), 3)
    assert again == kept
    assert [e["id"] for e in select_examples(examples, tokenized, None)[0]] == ["a", "b", "c", "d"]
    kept, kept_tokens = select_examples(examples, tokenized[1:], 10)   # "c" was dropped by tokenize
    assert [e["id"] for e in kept] == [r["id"] for r in kept_tokens] == ["a", "b", "d"]
    with pytest.raises(PipelineError, match="the test split is empty"):
        select_examples(examples, [], 3)


@pytest.fixture(scope="module")
def evaluated(tiny_base, tiny_data, tiny_trained):
    clean_dir, tokenized_dir = tiny_data
    examples = read_jsonl(clean_dir / "test.jsonl")
    metrics, samples = evaluate_models(PARAMS, tiny_base, tiny_trained["adapter"], examples,
                                       load_tokenized("test", tokenized_dir), tokenized_dir)
    return metrics, samples, examples


def test_base_and_tuned_metrics(evaluated):
    metrics, samples, _ = evaluated
    assert metrics["examples"] == PARAMS.max_examples == len(samples)
    for name in ("base", "tuned"):
        m = metrics[name]
        assert math.isfinite(m["loss"]) and m["perplexity"] == pytest.approx(math.exp(m["loss"]))
        assert 0.0 <= m["rougeL"] <= 1.0
        assert m["rougeL"] == pytest.approx(sum(s[f"rougeL_{name}"] for s in samples) / len(samples))
        assert m["mean_answer_words"] == pytest.approx(sum(len(s[name].split()) for s in samples) / len(samples))
    # The batch sizes each pass ran at, per model: evaluate.batch_size as set (no GPU memory ran out).
    sizes = {"loss": PARAMS.batch_size, "generation": PARAMS.batch_size}
    assert metrics["batch_size"] == {"requested": PARAMS.batch_size, "base": sizes, "tuned": sizes}
    # The tuned model is the base plus the adapter trained on this data: its test loss is lower.
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"] - 0.01
    assert metrics["rougeL_gain"] == pytest.approx(metrics["tuned"]["rougeL"] - metrics["base"]["rougeL"])


def test_samples_pair_prompt_reference_and_both_answers(evaluated):
    _, samples, examples = evaluated
    expected = sorted(examples, key=lambda e: e["id"])[:PARAMS.max_examples]
    assert [s["id"] for s in samples] == [e["id"] for e in expected]
    for sample, example in zip(samples, expected):
        assert set(sample) == {"id", "prompt", "reference", "base", "tuned", "rougeL_base", "rougeL_tuned"}
        assert sample["prompt"] == example["messages"][-2]["content"]
        assert sample["reference"] == example["messages"][-1]["content"]
        assert isinstance(sample["base"], str) and isinstance(sample["tuned"], str)
        for name in ("base", "tuned"):
            assert sample[f"rougeL_{name}"] == rouge_l(sample[name], sample["reference"])


def test_auto_batch_size_on_the_cpu_gives_the_same_results(evaluated, tiny_base, tiny_data, tiny_trained):
    """evaluate.batch_size: auto is 16 on the CPU (ftpipe.model.batch_memory.CPU_AUTO_BATCH), at most the number
    of examples; the batch changes the losses only within float noise."""
    import dataclasses

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    clean_dir, tokenized_dir = tiny_data
    metrics, _ = evaluate_models(dataclasses.replace(PARAMS, batch_size="auto"), tiny_base, tiny_trained["adapter"],
                                 read_jsonl(clean_dir / "test.jsonl"), load_tokenized("test", tokenized_dir),
                                 tokenized_dir)
    sizes = {"loss": PARAMS.max_examples, "generation": PARAMS.max_examples}
    assert metrics["batch_size"] == {"requested": "auto", "base": sizes, "tuned": sizes}
    for name in ("base", "tuned"):
        assert metrics[name]["loss"] == pytest.approx(evaluated[0][name]["loss"], abs=1e-4)
