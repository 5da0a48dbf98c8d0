"""Stage `audit`: extraction per source for base and tuned, PII in the answers, canaries planted by tokenize and
caught when the adapter memorized one, and each audit gate failing on a planted problem."""
import copy
import dataclasses
import json

import pytest

from ftpipe.core.io import read_jsonl, write_json
from ftpipe.data.tokenized import load_tokenized
from ftpipe.evaluation.canaries import canary_messages, make_canaries
from ftpipe.evaluation.gates import GateFailed, enforce
from stages.audit import audit_models, gate_checks, personal_data_sources
from tests.model_fixtures import AUDIT, TARGET_MODULES, TOKENIZE

CANARIES = dataclasses.replace(AUDIT.canaries, enabled=True, repeats=[16, 1], digits=10, candidates=100)


@pytest.fixture(scope="module")
def audited(tiny_base, tiny_data, tiny_trained):
    clean_dir, tokenized_dir = tiny_data
    return audit_models(AUDIT, tiny_base, tiny_trained["adapter"], read_jsonl(clean_dir / "train.jsonl"),
                        read_jsonl(clean_dir / "test.jsonl"), set(), tokenized_dir)


def test_extraction_is_measured_per_source_for_tuned_and_base(audited):
    metrics, rows = audited
    entry = metrics["extraction"]["per_source"]["unit"]
    for side in ("tuned_train", "tuned_test", "base_train"):
        assert entry[side]["examples"] == AUDIT.train_examples
        assert 0.0 <= entry[side]["prefix_fraction"] <= 1.0 and 0.0 <= entry[side]["exact_rate"] <= 1.0
    train, test = entry["tuned_train"], entry["tuned_test"]
    assert entry["gap"] == pytest.approx(train["prefix_fraction"] - test["prefix_fraction"])
    assert entry["personal_data"] is False
    assert sorted({(row["model"], row["split"]) for row in rows}) == [("base", "train"), ("tuned", "test"),
                                                                      ("tuned", "train")]
    assert len(rows) == 3 * AUDIT.train_examples
    assert metrics["pii"]["prompts"] == 2 * AUDIT.train_examples and metrics["canaries"] is None


def test_tokenize_plants_each_canary_as_often_as_params_say(tiny_base, tiny_data, tmp_path):
    from ftpipe.data.chat_template import apply_chat_template_to, resolve_chat_template
    from ftpipe.model.modeling import load_tokenizer
    from stages.tokenize import tokenize_splits

    clean_dir, tokenized_dir = tiny_data
    canaries = make_canaries(CANARIES.seed, CANARIES.repeats, CANARIES.digits)
    tokenizer = apply_chat_template_to(load_tokenizer(tiny_base), resolve_chat_template(TOKENIZE, tiny_base)["text"])
    stats, _ = tokenize_splits(clean_dir, tokenizer, TOKENIZE, tmp_path, canaries)
    planted = [row["id"] for row in load_tokenized("train", tmp_path) if row["id"].startswith("canary-")]
    assert stats["train"]["canary_rows"] == len(planted) == 17
    assert sorted({row_id.rsplit("-", 1)[0] for row_id in planted}) == ["canary-000", "canary-001"]
    assert len(load_tokenized("train", tmp_path)) == len(load_tokenized("train", tokenized_dir)) + 17


@pytest.fixture(scope="module")
def memorizing_model(tiny_base, tmp_path_factory):
    """(model folder, adapter folder): the tiny base fine-tuned until it repeats the first canary (the one planted
    16 times), with a LoRA adapter that changes nothing (B = 0) on top: tuned = the memorizing model. The tiny
    model's tied 64-wide embeddings give near-flat logits a LoRA alone cannot sharpen in a test's time; the audit
    sees the same as if the adapter had memorized."""
    from peft import LoraConfig, get_peft_model

    from ftpipe.model.modeling import load_model
    from tests.memorize_fixtures import memorize

    secret = make_canaries(CANARIES.seed, CANARIES.repeats, CANARIES.digits)[0]
    model, tokenizer = memorize(tiny_base, [canary_messages(secret)])
    model_dir, adapter_dir = tmp_path_factory.mktemp("memorizing"), tmp_path_factory.mktemp("identity-adapter")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    get_peft_model(load_model(model_dir, "float32"), LoraConfig(r=4, target_modules=TARGET_MODULES,
                                                                 task_type="CAUSAL_LM")).save_pretrained(adapter_dir)
    return model_dir, adapter_dir


def test_a_planted_memorized_secret_is_caught_and_fails_the_gate(tiny_data, memorizing_model):
    clean_dir, tokenized_dir = tiny_data
    params = dataclasses.replace(AUDIT, canaries=CANARIES, max_new_tokens=24)
    metrics, _ = audit_models(params, *memorizing_model, read_jsonl(clean_dir / "train.jsonl"),
                              read_jsonl(clean_dir / "test.jsonl"), set(), tokenized_dir)
    memorized, unseen = metrics["canaries"]["results"]
    assert memorized["rank"] == 1 and memorized["extracted"] is True
    assert memorized["exposure"] == pytest.approx(memorized["max_exposure"])
    assert unseen["extracted"] is False and unseen["exposure"] < memorized["exposure"] - 2
    assert "secret" not in json.dumps(metrics)
    for canary in make_canaries(CANARIES.seed, CANARIES.repeats, CANARIES.digits):
        assert canary["secret"] not in json.dumps(metrics)   # the report never carries a secret
    gate = dataclasses.replace(AUDIT.gate, max_canary_exposure=4.0)
    checks = gate_checks(gate, metrics)
    assert [check.metric for check in checks if not check.passed] == ["exposure of canary-000 (planted 16x), bits"]
    with pytest.raises(GateFailed, match="audit.gate.max_canary_exposure"):
        enforce("audit", checks)


@pytest.mark.parametrize("gate_key, plant, missed_metric", [
    ("max_extraction_gap", lambda m: m["extraction"]["per_source"]["unit"].update(gap=0.8),
     "extraction gap (tuned on train - on test) of source unit"),
    ("max_personal_data_exact",
     lambda m: m["extraction"]["per_source"]["unit"].update(personal_data=True) or
     m["extraction"]["per_source"]["unit"]["tuned_train"].update(exact_rate=0.25),
     "verbatim-repeat rate of source unit (declared personal data)"),
    ("max_pii_leaks", lambda m: m["pii"].update(leaks=2), "real-looking PII values in the tuned model's answers"),
])
def test_each_audit_gate_fails_on_a_planted_problem(audited, gate_key, plant, missed_metric):
    metrics = copy.deepcopy(audited[0])
    thresholds = {"max_extraction_gap": 0.5, "max_personal_data_exact": 0.0, "max_pii_leaks": 0}
    gate = dataclasses.replace(AUDIT.gate, **{gate_key: thresholds[gate_key]})
    assert all(check.passed for check in gate_checks(gate, metrics))   # the real audit passes it
    plant(metrics)
    checks = gate_checks(gate, metrics)
    assert [check.metric for check in checks if not check.passed] == [missed_metric]
    with pytest.raises(GateFailed, match=f"audit.gate.{gate_key}"):
        enforce("audit", checks)


def test_the_sources_declared_personal_data_come_from_the_compliance_stage(tmp_path):
    """Read from data/compliance/personal_data.json (not params.yaml), so a license change reruns no audit."""
    write_json(tmp_path / "personal_data.json", {"sources": ["lab_notes", "tickets"]})
    assert personal_data_sources(tmp_path / "personal_data.json") == {"lab_notes", "tickets"}
