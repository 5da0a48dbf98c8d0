"""`python -m ftpipe.chat --prompt`: the tiny fixtures' answers (random models: gibberish, compared for equality)
are exactly what transformers' greedy generate() and llama.cpp's create_chat_completion give when called directly,
alone on stdout; --side-by-side labels both; bad inputs exit 2 with one line naming the problem."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ftpipe.chat.backends import DEFAULT_N_CTX, Sampling, TransformersChat
from ftpipe.chat.cli import main
from ftpipe.chat.models import resolve
from ftpipe.chat.session import StrippedWriter
from tests.model_fixtures import lively_copy

REPO = Path(__file__).resolve().parents[2]
MAX_NEW = 12
PROMPT = "What does os.path.join do?"


def chat_project(tmp_path_factory, tiny_base: Path, adapter: Path, tiny_merged: Path) -> Path:
    """A folder laid out like a project after `make pipeline`: models/base, adapter, merged, gguf/model-f16.gguf
    and params.yaml. Built once per session for both test modules (params.yaml, copied last, marks it done)."""
    from ftpipe.gguf.export import convert

    root = tmp_path_factory.getbasetemp() / "chat-project"
    if (root / "params.yaml").is_file():
        return root
    models = root / "models"
    (models / "gguf").mkdir(parents=True, exist_ok=True)
    lively_copy(tiny_base, models / "base")
    lively_copy(tiny_merged, models / "merged")
    (models / "adapter").symlink_to(adapter)
    convert(models / "merged", "f16", models / "gguf" / "model-f16.gguf")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    return root


def chat_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ftpipe.chat", *args]


def direct_gguf_answer(llm, messages: list[dict], max_tokens: int = MAX_NEW) -> str:
    response = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=max_tokens)
    return response["choices"][0]["message"]["content"].strip()


def direct_hf_answer(folder: Path, messages: list[dict], adapter: Path | None = None) -> str:
    """Greedy generate() without any ftpipe.chat code: the tokenizer's chat template, the model's stop tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftpipe.model.modeling import inference_dtype, torch_dtype

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(inference_dtype()))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    encoded = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        out = model.generate(**encoded, do_sample=False, max_new_tokens=MAX_NEW,
                             eos_token_id=model.generation_config.eos_token_id,
                             pad_token_id=model.generation_config.eos_token_id)
    return tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base, tiny_trained, tiny_merged) -> Path:
    return chat_project(tmp_path_factory, tiny_base, tiny_trained["adapter"], tiny_merged)


@pytest.fixture(scope="module")
def gguf_llm(project):
    from ftpipe.gguf.runtime import open_gguf

    return open_gguf(project / "models" / "gguf" / "model-f16.gguf", DEFAULT_N_CTX)


@pytest.fixture(scope="module")
def expected(project, gguf_llm) -> dict[str, str]:
    """Each model's greedy answer to [user: PROMPT], computed directly."""
    messages = [{"role": "user", "content": PROMPT}]
    models = project / "models"
    answers = {"base": direct_hf_answer(models / "base", messages),
               "adapter": direct_hf_answer(models / "base", messages, adapter=models / "adapter"),
               "merged": direct_hf_answer(models / "merged", messages),
               "gguf": direct_gguf_answer(gguf_llm, messages)}
    assert all(answers.values()) and answers["base"] != answers["merged"]   # else the comparisons prove little
    return answers


@pytest.mark.parametrize("model", ["base", "adapter", "merged", "gguf"])
def test_prompt_prints_exactly_the_direct_answer(model, project, expected, capsys):
    code = main(["--project", str(project), "--model", model, "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW)])
    assert (code, capsys.readouterr().out) == (0, expected[model] + "\n")


def test_command_line_gguf_path_prints_the_answer_alone(project, gguf_llm):
    """The form scripts and the server test use, as a real process: only the answer and one newline on stdout."""
    path = project / "models" / "gguf" / "model-f16.gguf"
    done = subprocess.run(chat_command("--model", str(path), "--prompt", "hi", "--max-new-tokens", "16"),
                          cwd=project, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == direct_gguf_answer(gguf_llm, [{"role": "user", "content": "hi"}], 16) + "\n"


def test_side_by_side_prints_both_labelled_answers(project, expected):
    """In the project folder (the default --project), as a real process: base, then the tuned (merged) model."""
    done = subprocess.run(chat_command("--side-by-side", "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW)),
                          cwd=project, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"--- base ---\n{expected['base']}\n--- tuned (merged) ---\n{expected['merged']}\n"


def test_system_message_and_seeded_sampling(project, gguf_llm, capsys):
    system = "Answer in French."
    args = ["--project", str(project), "--model", "gguf", "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW)]
    assert main([*args, "--system", system]) == 0
    messages = [{"role": "system", "content": system}, {"role": "user", "content": PROMPT}]
    assert capsys.readouterr().out == direct_gguf_answer(gguf_llm, messages) + "\n"
    sampled = []
    for seed in (1, 1, 2):
        assert main([*args, "--temperature", "1.5", "--seed", str(seed)]) == 0
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1] != sampled[2]


def test_stopping_the_stream_stops_generation(project):
    """Ctrl-C while an answer streams closes the stream: the generating thread ends before the next answer."""
    import threading

    chat = TransformersChat(resolve("merged", project))
    steps = []
    chat.model.register_forward_hook(lambda *_: steps.append(1))
    stream = chat.stream([{"role": "user", "content": PROMPT}], Sampling(max_new_tokens=400))
    next(stream)
    stream.close()
    assert not [thread for thread in threading.enumerate() if thread.name == "generate"]
    assert len(steps) < 100   # of 400: the random model never says its end-of-turn token


def test_stripped_writer_prints_exactly_the_stripped_answer():
    import io

    out = io.StringIO()
    writer = StrippedWriter(out)
    for piece in [" ", "\n Hello", " ", "", " wide\n", "world \n", " \t"]:
        writer.write(piece)
    assert out.getvalue() == writer.text == " \n Hello  wide\nworld \n \t".strip()


@pytest.mark.parametrize("args, says", [
    (["--model", "nonsense"], ["'nonsense'", "base, adapter, merged, gguf", "gguf:<type>", "a path"]),
    (["--model", "gguf:q9"], ["'q9'", "q4_k_m"]),
    ([], ["models/merged", "make pipeline", "dvc repro"]),
    (["--model", "adapter"], ["models/base", "make pipeline"]),
    (["--model", "gguf"], ["models/gguf", "make pipeline"]),
    (["--model", "gguf:q8_0"], ["models/gguf/model-q8_0.gguf", "make pipeline"]),
    (["--model", "missing/model.gguf"], ["missing/model.gguf", "no such file"]),
    (["--side-by-side", "--model", "merged"], ["--tuned"]),
])
def test_bad_models_exit_2_naming_the_problem(args, says, tmp_path, capsys):
    assert main(["--project", str(tmp_path), "--prompt", "hi", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    for text in says:
        assert text in captured.err


def write_junk_gguf(folder: Path) -> Path:
    junk = folder / "x.gguf"
    junk.write_bytes(b"not a gguf file at all\x00\x01" * 64)
    return junk


def test_a_file_that_is_not_a_gguf_exits_2_naming_it(tmp_path):
    """As a real process: one line on stderr naming the file, no traceback."""
    junk = write_junk_gguf(tmp_path)
    done = subprocess.run(chat_command("--model", str(junk), "--prompt", "hi"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(f"error: {junk}: llama.cpp cannot load this GGUF: ")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_a_file_that_is_not_a_gguf_is_reported_with_llama_cpps_reason(tmp_path, capsys):
    assert main(["--model", str(write_junk_gguf(tmp_path)), "--prompt", "hi"]) == 2
    assert "invalid magic characters" in capsys.readouterr().err


def test_gguf_is_the_first_file_in_the_order_of_quantize_types(tmp_path):
    import yaml

    folder = tmp_path / "models" / "gguf"
    folder.mkdir(parents=True)
    for gguf_type in ("q8_0", "q4_k_m"):
        (folder / f"model-{gguf_type}.gguf").write_bytes(b"")
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["quantize"]["types"] = ["f16", "q4_k_m", "q8_0"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    assert resolve("gguf", tmp_path).path == folder / "model-q4_k_m.gguf"   # f16 is missing
    assert resolve("gguf:q8_0", tmp_path).label == "gguf:q8_0"
