"""Each family's tiny model through every stage, once per session and lazily: a test asks for a stage's result,
which runs the stages before it first (tests/families/families.py builds the models). A stage that failed fails
every test that needs it, with its own error."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from ftpipe.core.params import MergeParams, QuantizeParams
from tests.families.families import FAMILIES, Family
from tests.model_fixtures import EVALUATE, TOKENIZE, TRAIN, chat_row, row_id

# 8 training rows = 2 steps of 4; validation and test rows include a system prompt (every third) and a second
# turn (every fifth): 9, 10, 12 and 15 (both)
SPLIT_ROWS = {"train": range(0, 8), "validation": range(8, 14), "test": range(14, 18)}
# FTPIPE_FAMILIES_BACKEND picks train.backend: cpu here and in CI; unsloth or transformers on a CUDA machine, where
# bench/gpu_families.py runs this whole suite (evaluate and merge then run on the GPU too)
FAMILY_TRAIN = dataclasses.replace(TRAIN, max_steps=2, checkpoint_every=2,
                                   backend=os.environ.get("FTPIPE_FAMILIES_BACKEND", "cpu"),
                                   lora=dataclasses.replace(TRAIN.lora, target_modules=["all-linear"]))
if FAMILY_TRAIN.backend == "unsloth":
    import unsloth  # noqa: F401 - before transformers, peft and trl, as in the train stage's own process
MERGE = MergeParams(max_loss_gap_vs_adapter=0.01, max_loss_gap_vs_trained=0.5)
# min_greedy_agreement 0: a random tiny model's next-token distributions are nearly flat, so its greedy answers turn
# on near-ties that float16 weights can flip (Phi-3's f16 GGUF: loss gap 1e-6, and one answer differs by one
# token); the loss gap, tokenizer, chat prompt and stop-token checks are what these tests hold each family to
QUANTIZE = QuantizeParams(types=["f16", "q8_0"], max_loss_gap={"f16": 0.01, "q8_0": 0.05}, greedy_prompts=3,
                          min_greedy_agreement=0.0, max_new_tokens=8, harness_gguf=None)
BASE_DTYPE = "bfloat16"
# long enough for every family's whole conversations (gpt-oss's system header alone is about 80 tokens)
FAMILY_TOKENIZE = dataclasses.replace(TOKENIZE, max_seq_length=256)


class StageFailed(Exception):
    """A stage this test needs failed earlier in the session."""


class FamilyRun:
    """One family's stages, each run at most once; their results, or the error a stage raised."""

    def __init__(self, family: Family, root: Path, smollm2_tokenizer):
        self.family, self.root, self.smollm2_tokenizer = family, root, smollm2_tokenizer
        self.results: dict[str, object] = {}
        self.errors: dict[str, BaseException] = {}

    def get(self, stage: str):
        if stage in self.errors:
            raise StageFailed(f"{self.family.name}: stage {stage} failed: {self.errors[stage]}") \
                from self.errors[stage]
        if stage not in self.results:
            try:
                self.results[stage] = getattr(self, f"_{stage}")()
            except StageFailed as error:
                self.errors[stage] = error
                raise
            except Exception as error:   # kept: later tests that need this stage fail with its error
                self.errors[stage] = error
                raise
        return self.results[stage]

    def _source(self) -> Path:
        from tests.families.families import build_family_model

        return build_family_model(self.family, self.root / "source", self.smollm2_tokenizer)

    def _base(self) -> Path:
        from tests.model_fixtures import build_base

        return build_base(self.get("source"), self.root / "base")

    def _preflight(self):
        from ftpipe.model.architectures import require_supported_architecture

        return require_supported_architecture(self.get("base"))

    def _tokenize(self) -> tuple[Path, Path]:
        from ftpipe.core.io import write_json
        from ftpipe.data.chat_template import TEMPLATE_FILE, apply_chat_template_to, resolve_chat_template
        from ftpipe.model.modeling import load_tokenizer
        from stages.tokenize import tokenize_splits
        from tests.model_fixtures import write_clean

        base = self.get("base")
        clean_dir = write_clean(self.root / "clean", {split: [chat_row(n) for n in rows]
                                                      for split, rows in SPLIT_ROWS.items()})
        tokenized_dir = self.root / "tokenized"
        tokenized_dir.mkdir()
        chosen = resolve_chat_template(FAMILY_TOKENIZE, base)   # tokenize.chat_template null: the model's own
        tokenizer = apply_chat_template_to(load_tokenizer(base), chosen["text"])
        stats, _ = tokenize_splits(clean_dir, tokenizer, FAMILY_TOKENIZE, tokenized_dir)
        write_json(tokenized_dir / "stats.json", stats)
        (tokenized_dir / TEMPLATE_FILE).write_text(chosen["text"], encoding="utf-8")
        self.tokenize_stats = stats
        return clean_dir, tokenized_dir

    def _train(self) -> dict:
        from stages.train import train_adapter

        self.get("preflight")   # as the train stage does before training
        _, tokenized_dir = self.get("tokenize")
        (self.root / "adapter").mkdir()
        return train_adapter(FAMILY_TRAIN, FAMILY_TOKENIZE.max_seq_length, self.get("base"), tokenized_dir,
                             self.root / "checkpoints", self.root / "adapter")

    def _evaluate(self) -> tuple[dict, list]:
        from ftpipe.core.io import read_jsonl
        from ftpipe.data.tokenized import load_tokenized
        from stages.evaluate import evaluate_models

        self.get("train")
        clean_dir, tokenized_dir = self.get("tokenize")
        training_answers = [row["messages"][-1]["content"] for row in read_jsonl(clean_dir / "train.jsonl")]
        return evaluate_models(EVALUATE, self.get("base"), self.root / "adapter", read_jsonl(clean_dir / "test.jsonl"),
                               load_tokenized("test", tokenized_dir), training_answers, tokenized_dir)

    def _merge(self) -> tuple[Path, dict]:
        from ftpipe.data.tokenized import load_tokenized
        from stages.merge import check_parity, merge_adapter

        self.get("train")
        _, tokenized_dir = self.get("tokenize")
        merged = self.root / "merged"
        merged.mkdir()
        merge_adapter(self.get("base"), self.root / "adapter", BASE_DTYPE, merged, tokenized_dir)
        metrics = check_parity(MERGE, FAMILY_TRAIN.quantization, self.get("base"), self.root / "adapter", merged,
                               load_tokenized("validation", tokenized_dir))
        return merged, metrics

    def _quantize(self) -> tuple[Path, dict]:
        from ftpipe.core.io import read_jsonl
        from ftpipe.data.tokenized import load_tokenized
        from stages.quantize import quantize_and_check

        merged, _ = self.get("merge")
        clean_dir, tokenized_dir = self.get("tokenize")
        conversations = {row["id"]: row["messages"] for row in read_jsonl(clean_dir / "validation.jsonl")}
        out_dir = self.root / "gguf"
        out_dir.mkdir()
        return out_dir, quantize_and_check(QUANTIZE, merged, load_tokenized("validation", tokenized_dir),
                                           conversations, out_dir)


@pytest.fixture(scope="session")
def family_runs(tmp_path_factory, smollm2_tokenizer) -> dict[str, FamilyRun]:
    return {name: FamilyRun(family, tmp_path_factory.mktemp(f"family-{name}"), smollm2_tokenizer)
            for name, family in FAMILIES.items()}


@pytest.fixture
def run(request, family_runs) -> FamilyRun:
    """The run of the family the test is parametrized with (`family`)."""
    return family_runs[request.node.callspec.params["family"]]


def conversation(n: int) -> tuple[str, list[dict]]:
    row = chat_row(n)
    return row_id(row["messages"]), row["messages"]
