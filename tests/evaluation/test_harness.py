"""ftpipe.evaluation.harness: lm-eval 0.4.13 on a local six-question task (tests/fixtures/harness), offline, on the
tiny model, with and without a LoRA adapter, and on a GGUF through llama-cpp-python's server."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.evaluation.harness import compare, run_harness, run_harness_gguf
from tests.conftest import REPO

TASKS = REPO / "tests" / "fixtures" / "harness"
TASK = "ftpipe_tiny_mc"
HF_ARGS = {"limit": None, "num_fewshot": None, "batch_size": 8, "dtype": "float32", "device": "cpu"}


@pytest.fixture
def at_repo_root(monkeypatch):
    """The task's data_files are relative to the project root, where the pipeline runs."""
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="module")
def perturbed_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter (q_proj, v_proj) on the tiny model whose lora_B is random, not zero, so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 2.0)
    folder = tmp_path_factory.mktemp("harness-adapter")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base_and_tuned(tiny_model_dir, perturbed_adapter) -> tuple[dict, dict]:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        base = run_harness([TASK], tiny_model_dir, None, TASKS, **HF_ARGS)
        tuned = run_harness([TASK], tiny_model_dir, perturbed_adapter, TASKS, **HF_ARGS)
    return base, tuned


def test_base_run_on_a_local_task(base_and_tuned, tiny_model_dir):
    base, _ = base_and_tuned
    assert base["harness_version"] == "0.4.13"
    metrics = base["tasks"][TASK]
    assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
    assert metrics["brier_score"] >= 0.0 and "acc_stderr" in metrics
    assert base["n_samples"] == {TASK: 6}
    assert base["versions"] == {TASK: 1.0} and base["n_shot"] == {TASK: 0}
    assert base["higher_is_better"][TASK] == {"acc": True, "acc_norm": True, "brier_score": False}
    assert base["config"]["model_dir"] == str(tiny_model_dir) and base["config"]["adapter_dir"] is None
    json.dumps(base, allow_nan=False)   # ready for MLflow and the report as it is


def test_adapter_changes_the_scores(base_and_tuned, perturbed_adapter):
    base, tuned = base_and_tuned
    assert tuned["config"]["adapter_dir"] == str(perturbed_adapter) and tuned["n_samples"] == {TASK: 6}
    assert tuned["tasks"][TASK]["brier_score"] != base["tasks"][TASK]["brier_score"]   # the adapter was applied
    rows = compare(base, tuned)[TASK]
    assert set(rows) == {"acc", "acc_norm", "brier_score"}   # stderr left out
    brier = rows["brier_score"]
    assert brier["change"] == pytest.approx(brier["tuned"] - brier["base"]) and brier["higher_is_better"] is False


def test_compare_over_tasks_and_metrics_of_either_run():
    base = {"tasks": {"a": {"acc": 0.5, "acc_stderr": 0.1, "f1": None}, "b": {"acc": 0.2}},
            "higher_is_better": {"a": {"acc": True, "exact_match": True}}}
    tuned = {"tasks": {"a": {"acc": 0.75, "f1": 0.3, "exact_match/strict-match": 0.4}, "c": {"acc": 1.0}}}
    assert compare(base, tuned) == {
        "a": {"acc": {"base": 0.5, "tuned": 0.75, "change": 0.25, "higher_is_better": True},
              "exact_match/strict-match": {"base": None, "tuned": 0.4, "change": None, "higher_is_better": True},
              "f1": {"base": None, "tuned": 0.3, "change": None}},
        "b": {"acc": {"base": 0.2, "tuned": None, "change": None}},
        "c": {"acc": {"base": None, "tuned": 1.0, "change": None}}}


def test_no_tasks_loads_nothing(tmp_path):
    result = run_harness([], tmp_path / "no-model", None, None, **HF_ARGS)
    assert result["tasks"] == {} and result["n_samples"] == {} and result["harness_version"] == "0.4.13"


def test_unknown_task_names_it_and_close_names(tmp_path, at_repo_root):
    with pytest.raises(PipelineError) as caught:
        run_harness(["ftpipe_tiny_mcq"], tmp_path / "never-loaded", None, TASKS, **HF_ARGS)
    message = str(caught.value)
    assert "'ftpipe_tiny_mcq'" in message and "ftpipe_tiny_mc" in message   # the local task is the close name
    assert "Hub" in message and "offline" in message and "cache" in message


def test_include_path_must_be_a_folder(tmp_path):
    with pytest.raises(PipelineError, match="include_path"):
        run_harness([TASK], tmp_path, None, tmp_path / "missing", **HF_ARGS)


def test_gguf_without_bos_is_refused(tiny_gguf_base):
    with pytest.raises(PipelineError, match="adds no BOS token"):
        run_harness_gguf([TASK], tiny_gguf_base, TASKS, 2, None)


def test_gguf_with_bos_through_llama_cpp_server(tiny_gguf_base, tmp_path, at_repo_root):
    """The tiny GGUF with tokenizer.ggml.add_bos_token set (a copy): llama-cpp-python's echoed log-probabilities are
    then aligned. One document (4 requests) keeps it short: the server sorts the 49k-token vocabulary per token."""
    from gguf import GGUFReader

    path = Path(shutil.copy(tiny_gguf_base, tmp_path / "with-bos.gguf"))
    field = GGUFReader(str(path), "r+").fields["tokenizer.ggml.add_bos_token"]
    field.parts[field.data[0]][0] = True
    result = run_harness_gguf([TASK], path, TASKS, 1, None)
    assert result["n_samples"] == {TASK: 1} and result["config"]["model"] == "gguf"
    assert 0.0 <= result["tasks"][TASK]["acc"] <= 1.0 and result["tasks"][TASK]["brier_score"] >= 0.0
    json.dumps(result, allow_nan=False)
