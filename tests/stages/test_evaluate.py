"""Stage `evaluate`: a stable example subset; base vs tuned metrics (task metrics overall and per source,
general-text loss) and scored samples for the tiny model and its trained adapter; each gate failing on a planted
regression, and the drift check against a previous release."""
import copy
import dataclasses
import json
import math

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.core.evaluation_params import DriftParams, EvaluateGateParams
from ftpipe.core.io import read_jsonl
from ftpipe.data.tokenized import load_tokenized
from ftpipe.evaluation.drift import drift_metrics
from ftpipe.evaluation.gates import GateFailed, enforce, require_passed, verdict
from ftpipe.evaluation.task_metrics import METRICS, score_answer
from stages.evaluate import drift, evaluate_models, gate_checks, select_examples
from tests.model_fixtures import EVALUATE as PARAMS


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
                                       load_tokenized("test", tokenized_dir), training_answers(clean_dir),
                                       tokenized_dir)
    return metrics, samples, examples


def training_answers(clean_dir) -> list[str]:
    return [row["messages"][-1]["content"] for row in read_jsonl(clean_dir / "train.jsonl")]


def test_base_and_tuned_metrics(evaluated):
    metrics, samples, _ = evaluated
    assert metrics["examples"] == PARAMS.max_examples == len(samples)
    for name in ("base", "tuned"):
        m = metrics[name]
        assert math.isfinite(m["loss"]) and m["perplexity"] == pytest.approx(math.exp(m["loss"]))
        for metric in METRICS:   # each task metric: the mean of the samples' scores, overall and per source
            assert 0.0 <= m[metric] <= 1.0
            assert m[metric] == pytest.approx(sum(s["scores"][name][metric] for s in samples) / len(samples))
            for source, summary in metrics["task"]["per_source"].items():
                own = [s["scores"][name][metric] for s in samples if s["source"] == source]
                assert summary[name][metric] == pytest.approx(sum(own) / len(own))
        general = metrics["general_text"][name]
        assert math.isfinite(general["loss"]) and general["perplexity"] == pytest.approx(math.exp(general["loss"]))
        assert m["mean_answer_words"] == pytest.approx(sum(len(s[name].split()) for s in samples) / len(samples))
    # The batch sizes each pass ran at, per model: evaluate.batch_size as set (no GPU memory ran out).
    sizes = {"loss": PARAMS.batch_size, "generation": PARAMS.batch_size}
    assert metrics["batch_size"] == {"requested": PARAMS.batch_size, "base": sizes, "tuned": sizes}
    # The tuned model is the base plus the adapter trained on this data: its test loss is lower.
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"] - 0.01
    assert metrics["rougeL_gain"] == pytest.approx(metrics["tuned"]["rougeL"] - metrics["base"]["rougeL"])
    assert metrics["general_text"]["set"] | {"sha256": None} == {
        "source": "python_reference", "license": "PSF-2.0", "passages": 4, "max_tokens": 32, "sha256": None,
        "origin": metrics["general_text"]["set"]["origin"]}
    assert metrics["general_text"]["loss_increase"] == pytest.approx(
        metrics["general_text"]["tuned"]["loss"] - metrics["general_text"]["base"]["loss"])


def test_samples_pair_prompt_reference_and_both_answers(evaluated):
    _, samples, examples = evaluated
    expected = sorted(examples, key=lambda e: e["id"])[:PARAMS.max_examples]
    assert [s["id"] for s in samples] == [e["id"] for e in expected]
    for sample, example in zip(samples, expected):
        assert set(sample) == {"id", "source", "prompt", "reference", "base", "tuned", "scores"}
        assert sample["source"] == example["source"]
        assert sample["prompt"] == example["messages"][-2]["content"]
        assert sample["reference"] == example["messages"][-1]["content"]
        assert isinstance(sample["base"], str) and isinstance(sample["tuned"], str)
        for name in ("base", "tuned"):
            assert sample["scores"][name] == score_answer(sample[name], sample["reference"])


def test_auto_batch_size_on_the_cpu_gives_the_same_results(evaluated, tiny_base, tiny_data, tiny_trained):
    """evaluate.batch_size: auto is 16 on the CPU (ftpipe.model.batch_memory.CPU_AUTO_BATCH), at most the number
    of examples; the batch changes the losses only within float noise."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    clean_dir, tokenized_dir = tiny_data
    metrics, _ = evaluate_models(dataclasses.replace(PARAMS, batch_size="auto"), tiny_base, tiny_trained["adapter"],
                                 read_jsonl(clean_dir / "test.jsonl"), load_tokenized("test", tokenized_dir),
                                 training_answers(clean_dir), tokenized_dir)
    sizes = {"loss": PARAMS.max_examples, "generation": PARAMS.max_examples}
    assert metrics["batch_size"] == {"requested": "auto", "base": sizes, "tuned": sizes}
    for name in ("base", "tuned"):
        assert metrics[name]["loss"] == pytest.approx(evaluated[0][name]["loss"], abs=1e-4)


GATE = EvaluateGateParams("rougeL", min_gain=-1.0, min_source_score=0.0, max_tuned_loss=100.0,
                          max_general_loss_increase=100.0)


def planted(metrics: dict, path: tuple, value: float) -> dict:
    changed = copy.deepcopy(metrics)
    node = changed
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return changed


def test_the_gates_pass_a_run_that_meets_them(evaluated):
    checks = gate_checks(GATE, evaluated[0])
    assert len(checks) == 3 + len(evaluated[0]["task"]["per_source"]) and all(check.passed for check in checks)
    enforce("evaluate", checks)


@pytest.mark.parametrize("gate, path, value, key", [
    (dataclasses.replace(GATE, min_gain=0.05), ("task", "overall", "gain", "rougeL"), -0.2,
     "evaluate.gate.min_gain"),
    (dataclasses.replace(GATE, max_tuned_loss=3.0), ("tuned", "loss"), 4.5, "evaluate.gate.max_tuned_loss"),
    (dataclasses.replace(GATE, max_general_loss_increase=0.5), ("general_text", "loss_increase"), 1.7,
     "evaluate.gate.max_general_loss_increase"),
])
def test_each_gate_fails_on_a_planted_regression_naming_metric_value_and_threshold(evaluated, gate, path, value,
                                                                                   key):
    checks = gate_checks(gate, planted(evaluated[0], path, value))
    missed = [check for check in checks if not check.passed]
    assert [check.key for check in missed] == [key]
    with pytest.raises(GateFailed) as failure:
        enforce("evaluate", checks)
    message = str(failure.value)
    assert key in message and f"{value:.4f}" in message and "nothing downstream is built or released" in message
    assert verdict(checks, {"adapter": "x"}) == {"passed": False, "subject": {"adapter": "x"}}


def test_the_per_source_gate_names_the_source_that_fell_short(evaluated):
    metrics = copy.deepcopy(evaluated[0])
    summary = next(iter(metrics["task"]["per_source"].values()))
    summary["tuned"]["chrF"] = 0.5
    metrics["task"]["per_source"]["support_tickets"] = copy.deepcopy(summary)
    metrics["task"]["per_source"]["support_tickets"]["tuned"]["chrF"] = 0.01
    checks = gate_checks(dataclasses.replace(GATE, task_metric="chrF", min_source_score=0.02), metrics)
    assert [check.metric for check in checks if not check.passed] == ["tuned chrF on source support_tickets"]


def write_baseline(tmp_path, metrics: dict, **changes) -> str:
    baseline = drift_metrics(metrics) | {"release": {"report_created_at": "2026-11-30T10:00:00+00:00"}}
    for metric, value in changes.items():
        baseline["metrics"][metric] = value
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(baseline))
    return str(path)


def test_drift_against_the_previous_release(evaluated, tmp_path, capsys):
    metrics = evaluated[0]
    params = DriftParams(baseline=None, max_regression={"rougeL": 0.03, "loss": 0.05, "general_loss": 0.05},
                         on_regression="fail")
    same = dataclasses.replace(params, baseline=write_baseline(tmp_path, metrics))
    comparison, checks = drift(dataclasses.replace(PARAMS, drift=same), metrics)
    assert [row["worse_by"] for row in comparison["rows"]] == [0.0, 0.0, 0.0] and all(c.passed for c in checks)
    # the last release was better: ROUGE-L higher by 0.1 and the test loss lower by 0.2
    better = write_baseline(tmp_path, metrics, rougeL=metrics["tuned"]["rougeL"] + 0.1,
                            loss=metrics["tuned"]["loss"] - 0.2)
    comparison, checks = drift(dataclasses.replace(PARAMS, drift=dataclasses.replace(params, baseline=better)),
                               metrics)
    regressed = {row["metric"]: row["worse_by"] for row in comparison["rows"] if row["regressed"]}
    assert regressed == pytest.approx({"rougeL": 0.1, "loss": 0.2})
    with pytest.raises(GateFailed, match="evaluate.drift.max_regression.rougeL"):
        enforce("evaluate", checks)
    # on_regression: warn keeps the comparison and warns, and fails nothing
    warn = dataclasses.replace(params, baseline=better, on_regression="warn")
    comparison, checks = drift(dataclasses.replace(PARAMS, drift=warn), metrics)
    assert checks == [] and sum(row["regressed"] for row in comparison["rows"]) == 2
    assert "worse than the last release by 0.1000" in capsys.readouterr().out


def test_drift_skips_what_was_measured_on_other_examples(evaluated, tmp_path):
    metrics = evaluated[0]
    path = write_baseline(tmp_path, metrics, rougeL=0.99)
    baseline = json.loads(open(path).read())
    baseline["measured_on"]["test_examples_sha256"] = "0" * 64
    open(path, "w").write(json.dumps(baseline))
    params = DriftParams(baseline=path, max_regression={"rougeL": 0.03, "general_loss": 0.05}, on_regression="fail")
    comparison, checks = drift(dataclasses.replace(PARAMS, drift=params), metrics)
    assert comparison["skipped"] == {"rougeL": "measured on other examples than the baseline's"}
    assert [row["metric"] for row in comparison["rows"]] == ["general_loss"]
    # a first release has no baseline: nothing compared, and the stage says how to make one
    comparison, checks = drift(dataclasses.replace(PARAMS, drift=dataclasses.replace(
        params, baseline=str(tmp_path / "none.json"))), metrics)
    assert comparison["rows"] == [] and comparison["missing"] == str(tmp_path / "none.json") and checks == []
    open(path, "w").write("{}")
    with pytest.raises(PipelineError, match="python -m ftpipe.release.baseline"):
        drift(dataclasses.replace(PARAMS, drift=params), metrics)


def test_downstream_stages_refuse_a_failed_or_foreign_verdict(tmp_path):
    path = tmp_path / "gate.json"
    subject = {"adapter_content_sha256": "a" * 64}
    path.write_text(json.dumps({"passed": False, "subject": subject}))
    with pytest.raises(GateFailed, match="says the gate failed"):
        require_passed(path, subject, "merge")
    path.write_text(json.dumps({"passed": True, "subject": {"adapter_content_sha256": "b" * 64}}))
    with pytest.raises(GateFailed, match="was made for"):
        require_passed(path, subject, "merge")
    path.write_text(json.dumps({"passed": True, "subject": subject}))
    require_passed(path, subject, "merge")
