"""Stage `quantize`: the merged tiny model exported to f16, q8_0 and q4_k_m, each file checked in llama.cpp
(loss on the validation labels, tokenizer, chat prompt, stop token) and the f16 file's greedy answers
compared with the merged model's; a wrong chat template, a wrong stop token or a too-tight tolerance fails
naming the file and what differs, and publishes nothing."""
import dataclasses
import hashlib
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import atomic_dir, read_jsonl
from ftpipe.core.params import QuantizeParams
from ftpipe.data.tokenized import load_tokenized
from ftpipe.gguf.runtime import open_gguf
from stages.quantize import SCRATCH_F16, check_file, greedy_check, greedy_prompts, quantize_and_check, reference

PARAMS = QuantizeParams(types=["f16", "q8_0", "q4_k_m"], max_loss_gap={"f16": 0.01, "q8_0": 0.05, "q4_k_m": 0.5},
                        greedy_prompts=4, min_greedy_agreement=0.75, max_new_tokens=8, harness_gguf=None)


@pytest.fixture(scope="module")
def validation(tiny_data) -> tuple[list[dict], dict]:
    clean_dir, tokenized_dir = tiny_data
    conversations = {row["id"]: row["messages"] for row in read_jsonl(clean_dir / "validation.jsonl")}
    return load_tokenized("validation", tokenized_dir), conversations


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_merged, validation):
    out_dir = tmp_path_factory.mktemp("gguf")
    return out_dir, quantize_and_check(PARAMS, tiny_merged, *validation, out_dir)


def test_each_type_is_written_with_its_size_hash_and_real_tensor_types(quantized):
    out_dir, metrics = quantized
    assert sorted(path.name for path in out_dir.iterdir()) == [f"model-{t}.gguf" for t in ("f16", "q4_k_m", "q8_0")]
    assert list(metrics["files"]) == PARAMS.types
    for gguf_type, entry in metrics["files"].items():
        path = out_dir / f"model-{gguf_type}.gguf"
        assert entry["file"] == path.name and entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert sum(part["bytes"] for part in entry["types"].values()) < entry["bytes"]   # + metadata, vocabulary
    files = metrics["files"]
    assert set(files["f16"]["types"]) == {"F16", "F32"} and set(files["q8_0"]["types"]) == {"Q8_0", "F32"}
    # the tiny model's rows are 64 wide, not a multiple of a K-quant block (256): llama.cpp falls back to
    # other types for every matrix of a "q4_k_m" file, and the metrics say so
    assert "Q4_K" not in files["q4_k_m"]["types"] and files["q4_k_m"]["types"].keys() - {"F32"}
    assert files["q4_k_m"]["bits_per_weight"] < files["q8_0"]["bits_per_weight"] < files["f16"]["bits_per_weight"]


def test_each_gguf_matches_the_merged_model_in_llama_cpp(quantized, tiny_merged, validation):
    from ftpipe.model.modeling import load_model, load_tokenizer, mean_loss

    _, metrics = quantized
    rows, conversations = validation
    merged = metrics["merged_validation_loss"]
    assert merged == pytest.approx(mean_loss(load_model(tiny_merged, "float32"), rows,
                                             load_tokenizer(tiny_merged).pad_token_id, 16, "merged")["loss"])
    assistant_turns = sum(m["role"] == "assistant" for row in rows for m in conversations[row["id"]])
    assert assistant_turns > len(rows)   # some conversations have two turns: both prompts are compared
    for entry in metrics["files"].values():
        assert math.isfinite(entry["validation_loss"])
        assert entry["loss_gap"] == pytest.approx(entry["validation_loss"] - merged)
        assert entry["tokenizer_mismatches"] == 0 and entry["stop_token_problems"] == []
        assert entry["chat_prompts_compared"] == assistant_turns and entry["chat_prompt_mismatches"] == 0
    gaps = {gguf_type: abs(entry["loss_gap"]) for gguf_type, entry in metrics["files"].items()}
    # float16 weights are exact in f16 (measured gap 3e-6: float32 sums in a different order); 8-bit and 4-5-bit
    # blocks are lossy, more so with fewer bits (measured 0.00025 and more)
    assert gaps["f16"] < 1e-4 < gaps["q8_0"] < gaps["q4_k_m"] <= PARAMS.max_loss_gap["q4_k_m"]
    assert metrics["end_of_turn_ids"] == [2] and metrics["end_of_turn_tokens"] == ["<|im_end|>"]


def test_greedy_answers_of_the_f16_file_are_the_merged_models(quantized, tiny_merged, validation):
    _, metrics = quantized
    rows, conversations = validation
    prompts = greedy_prompts(rows, conversations, PARAMS.greedy_prompts)
    expected = reference(PARAMS, tiny_merged, rows, prompts)["answers"]
    greedy = metrics["greedy"]
    assert greedy["prompts"] == 4 and greedy["needed"] == 3
    # tiny_merged's greedy answers are empty (a run of newlines): the lively model's tests below compare words
    assert [pair["merged"] for pair in greedy["pairs"]] == [answer.text for answer in expected]
    assert [pair["prompt"] for pair in greedy["pairs"]] == [messages[-1]["content"] for messages, _ in prompts]
    assert greedy["same_text"] >= greedy["needed"]
    assert greedy["stopped_where_merged_stopped"] == greedy["merged_stopped"]


def edited_gguf(source: Path, target: Path, *options: str) -> Path:
    """A copy of `source` with metadata changed by gguf's own gguf-new-metadata tool."""
    tool = Path(sys.executable).parent / "gguf-new-metadata"
    subprocess.run([str(tool), str(source), str(target), "--force", *options], check=True, capture_output=True)
    return target


@pytest.fixture(scope="module")
def reference_of_merged(tiny_merged, validation):
    rows, conversations = validation
    return reference(PARAMS, tiny_merged, rows, greedy_prompts(rows, conversations, 2))


def test_a_wrong_chat_template_fails_naming_it(tmp_path, quantized, validation, reference_of_merged):
    # A plain ChatML template: no default system prompt, which SmolLM2's own template adds
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    path = edited_gguf(quantized[0] / "model-f16.gguf", tmp_path / "model-f16.gguf", "--chat-template", chatml)
    entry, failures, llm = check_file(PARAMS, "f16", path, *validation, reference_of_merged, 512)
    llm.close()
    assert entry["chat_prompt_mismatches"] > 0 and entry["tokenizer_mismatches"] == 0
    assert len(failures) == 1
    assert failures[0].startswith("model-f16.gguf: wrong chat template: the GGUF's tokenizer.chat_template")
    assert "You are a helpful AI assistant" in failures[0]   # the expected prompt, which the template lost


def test_a_wrong_stop_token_fails_naming_it(tmp_path, quantized, validation, reference_of_merged):
    path = edited_gguf(quantized[0] / "model-q8_0.gguf", tmp_path / "model-q8_0.gguf",
                       "--special-token", "eos", "<|endoftext|>")
    entry, failures, llm = check_file(PARAMS, "q8_0", path, *validation, reference_of_merged, 512)
    llm.close()
    assert failures == ["model-q8_0.gguf: wrong stop token: its end-of-sequence token is 0 '<|endoftext|>', not "
                        "the merged model's end-of-turn token 2 '<|im_end|>'"]
    assert entry["stop_token_problems"] and entry["chat_prompt_mismatches"] == 0


def test_a_too_tight_tolerance_fails_naming_the_file_and_the_key(tmp_path, tiny_merged, validation):
    params = QuantizeParams(types=["q4_k_m"], max_loss_gap={"q4_k_m": 0.0}, greedy_prompts=2,
                            min_greedy_agreement=0.0, max_new_tokens=4, harness_gguf=None)
    final = tmp_path / "gguf"
    with pytest.raises(PipelineError) as error:
        with atomic_dir(final) as out_dir:
            quantize_and_check(params, tiny_merged, *validation, out_dir)
    message = str(error.value)
    assert "nothing was published" in message
    assert "model-q4_k_m.gguf: validation loss " in message
    assert "exceeds quantize.max_loss_gap.q4_k_m = 0.0" in message
    assert "tokenizer" not in message and "chat template" not in message and "stop token" not in message
    assert list(tmp_path.iterdir()) == []   # neither the folder nor a temporary one is left


def test_without_f16_in_types_the_scratch_f16_answers_and_is_not_published(tmp_path, tiny_merged, validation):
    params = QuantizeParams(types=["q8_0"], max_loss_gap={"q8_0": 0.05}, greedy_prompts=2,
                            min_greedy_agreement=0.5, max_new_tokens=4, harness_gguf=None)
    metrics = quantize_and_check(params, tiny_merged, *validation, tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model-q8_0.gguf"]
    assert not (tmp_path / SCRATCH_F16).exists()
    assert metrics["greedy"]["prompts"] == 2


@pytest.fixture(scope="module")
def lively_greedy(tmp_path_factory, lively_merged, validation):
    """The quantize checks on a model whose greedy answers are words, not empty (tiny_merged's are empty)."""
    params = dataclasses.replace(PARAMS, types=["f16"], max_loss_gap={"f16": 0.05}, greedy_prompts=6,
                                 min_greedy_agreement=5 / 6, max_new_tokens=8)
    out_dir = tmp_path_factory.mktemp("lively-gguf")
    return params, out_dir, quantize_and_check(params, lively_merged, *validation, out_dir)


def test_greedy_answers_that_say_something_are_the_same_in_llama_cpp(lively_greedy):
    params, _, metrics = lively_greedy
    greedy = metrics["greedy"]
    merged = [pair["merged"] for pair in greedy["pairs"]]
    assert all(merged) and len(set(merged)) > 1   # answers with text, depending on the prompt
    assert greedy["prompts"] == 6 and greedy["needed"] == 5 and greedy["same_text"] >= 5


def test_greedy_answers_of_another_model_fail_naming_the_count_and_a_difference(lively_greedy, lively_merged,
                                                                                tiny_gguf, validation):
    params, _, _ = lively_greedy
    rows, conversations = validation
    prompts = greedy_prompts(rows, conversations, params.greedy_prompts)
    ref = reference(params, lively_merged, rows, prompts)
    llm = open_gguf(tiny_gguf, 512)   # the model before scaling: other answers
    result, failures = greedy_check(params, llm, ref, prompts, "model-f16.gguf")
    llm.close()
    assert result["same_text"] < 5
    assert failures[0].startswith(f"model-f16.gguf: llama.cpp's greedy answers equal the merged model's on "
                                  f"{result['same_text']} of 6 validation prompts; quantize.min_greedy_agreement "
                                  f"needs 5 (first difference, prompt ")


def test_the_harness_runs_on_the_chosen_gguf_or_says_why_not(tmp_path, tiny_gguf_base, monkeypatch):
    """quantize.harness_gguf: the tiny GGUF adds no BOS token, so llama.cpp's echoed log-probabilities would be
    shifted (ftpipe/evaluation/harness.py): the stage records why it did not run, and fails nothing."""
    import dataclasses
    import shutil

    from ftpipe.core.params import load_params
    from stages.quantize import gguf_harness
    from tests.conftest import REPO

    shutil.copy2(tiny_gguf_base, tmp_path / "model-f16.gguf")
    params = load_params(REPO / "params.yaml")
    harness = dataclasses.replace(params.evaluate.harness, tasks=["ftpipe_tiny_mc"],
                                  include_path="tests/fixtures/harness", limit=1)
    chosen = dataclasses.replace(params, evaluate=dataclasses.replace(params.evaluate, harness=harness),
                                 quantize=dataclasses.replace(params.quantize, harness_gguf="f16"))
    metrics = {"files": {"f16": {"file": "model-f16.gguf"}}}
    result = gguf_harness(chosen, metrics, tmp_path)
    assert result["gguf_type"] == "f16" and "adds no BOS token" in result["not_run"]
    # no harness_gguf, or no tasks: nothing runs
    assert gguf_harness(params, metrics, tmp_path) is None
