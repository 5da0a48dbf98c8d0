"""ftpipe.release.model_card: each released artifact's README.md states the concluded license, not a fixed one.
Pure, fast."""
from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from ftpipe.compliance.licenses import LicenseDeclaration, LicensePolicy, conclude_licenses, reviewed_license_properties
from ftpipe.core.errors import PipelineError
from ftpipe.core.params import ReviewedLicense
from ftpipe.release.model_card import CARD_FILE, model_card

EXAMPLE = Path(__file__).parents[1] / "fixtures" / "report_example.json"
HOSTILE_NAME = "evil | name\n---\nlicense: mit\n# Heading"
HOSTILE_CREATOR = "Mallory: {a: [b]} # not a comment | x\n| injected | row |"
HOSTILE_BASE_ID = "org/model\n---\nlicense: apache-2.0 # '\"|"


@pytest.fixture
def report() -> dict:
    return json.loads(EXAMPLE.read_text())


def split_card(card: str) -> tuple[dict, str]:
    """The front matter (parsed) and the Markdown body, split the way the Hub splits them."""
    assert card.startswith("---\n")
    front, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def section(body: str, heading: str) -> str:
    """The text of one `## ` section, up to the next one."""
    start = body.index(f"\n## {heading}\n")
    end = body.find("\n## ", start + 1)
    return body[start:end if end != -1 else None]


def table_rows(body: str) -> list[str]:
    return [line for line in body.splitlines() if line.startswith("|")]


def unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def commercial_report(report: dict) -> dict:
    """Only Apache-2.0 inputs, intended for commercial use: the gate concluded plain Apache-2.0."""
    report = copy.deepcopy(report)
    source = report["data_sources"][0]
    source.update(license="Apache-2.0", license_url="https://www.apache.org/licenses/LICENSE-2.0")
    report["data_sources"] = [source]
    compliance = report["compliance"]
    compliance["policy"]["intended_use"] = "commercial"
    compliance.update(concluded_license="Apache-2.0", commercial_use_allowed=True, share_alike=[],
                      non_commercial_sources=[], unknown_licenses=[], notes=[],
                      inputs=[compliance["inputs"][0], {"role": "data source", "name": source["name"],
                                                        "declared": "Apache-2.0", "chosen": "Apache-2.0"}],
                      attribution=[compliance["attribution"][0],
                                   {"source": source["name"], "license": "Apache-2.0", "notice": "keep notices"}])
    return report


def test_card_file_is_the_hub_readme():
    assert CARD_FILE == "README.md"


def test_research_report_card_is_non_commercial_with_other_license(report):
    meta, body = split_card(model_card(report, "merged"))
    assert meta["license"] == "other"
    assert meta["license_name"] == "apache-2.0-and-cc-by-nc-4.0-and-cc-by-sa-4.0-and-psf-2.0"
    assert meta["license_link"] == "#license"
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["base_model_relation"] == "finetune" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"ftpipe", "qlora", "lora", "non-commercial"} <= set(meta["tags"])
    license_text = section(body, "License")
    assert "Apache-2.0 AND CC-BY-NC-4.0 AND CC-BY-SA-4.0 AND PSF-2.0" in license_text
    assert "**Commercial use: not allowed**, because of: lab_notes (CC-BY-NC-4.0, non-commercial)." in license_text
    assert "**Commercial use: allowed**" not in body
    assert "**research**" in license_text


def test_license_section_lists_every_obligation(report):
    license_text = section(split_card(model_card(report, "merged"))[1], "License")
    share_alike = license_text.split("### Share-alike and copyleft obligations")[1].split("###")[0]
    assert "forum_answers (CC-BY-SA-4.0, share-alike): the model and any adaptation of it must be shared" in share_alike
    for entry in report["compliance"]["attribution"]:
        assert f"- {entry['source']} ({entry['license']}): {entry['notice']}" in license_text
    for note in report["compliance"]["notes"]:
        assert f"- {note}" in license_text
    base_terms = license_text.split("### Base model terms carried through")[1].split("###")[0]
    assert "HuggingFaceTB/SmolLM2-135M-Instruct: Apache-2.0 (https://www.apache.org/licenses/LICENSE-2.0)" in base_terms
    assert "### Unknown licenses" not in license_text


def test_commercial_report_card_uses_the_hub_license_id(report):
    meta, body = split_card(model_card(commercial_report(report), "merged"))
    assert meta["license"] == "apache-2.0"
    assert "license_name" not in meta and "license_link" not in meta
    assert "non-commercial" not in meta["tags"]
    assert "**Commercial use: allowed**" in body and "not allowed" not in body
    assert "none: no input's license propagates to the model" in section(body, "License")


def test_each_gguf_card_shows_its_own_file_and_evaluation(report):
    for own, other in (("f16", "q8_0"), ("q8_0", "f16"), ("q4_k_m", "f16")):
        meta, body = split_card(model_card(report, f"gguf-{own}"))
        assert meta["base_model_relation"] == "quantized" and meta["library_name"] == "gguf"
        assert {"gguf", own} <= set(meta["tags"]) and other not in meta["tags"]
        own_file = next(a for a in report["artifacts"] if a["name"] == f"gguf-{own}")["files"][0]
        other_file = next(a for a in report["artifacts"] if a["name"] == f"gguf-{other}")["files"][0]
        files = section(body, "Files")
        assert f"model-{own}.gguf" in files and f"{own_file['bytes']:,} bytes" in files
        assert f"{own_file['sha256']}  model-{own}.gguf" in files   # the sha256sum -c line
        assert other_file["sha256"] not in body and f"model-{other}.gguf" not in body
        evaluation = section(body, "Evaluation")
        own_eval, other_eval = report["evaluation"]["gguf"][own], report["evaluation"]["gguf"][other]
        assert f"validation loss {own_eval['validation_loss']:.4f}" in evaluation
        assert f"gap vs the merged model {own_eval['loss_gap']:+.6f}" in evaluation
        assert f"{other_eval['loss_gap']:+.6f}" not in evaluation
        assert "tokenizer check against the Hugging Face tokenizer: passed" in evaluation
        assert f"{own_eval['bits_per_weight']} bits per weight" in evaluation
    assert "model-q8_0.gguf" in section(split_card(model_card(report, "gguf-q8_0"))[1], "Files")
    assert "138.1 MiB" in model_card(report, "gguf-q8_0")


def test_a_gguf_card_states_the_tensor_mix_the_llama_cpp_checks_and_the_build(report):
    """A Q4_K_M file on 576-wide rows is mostly Q5_0 and Q8_0 (fallbacks): the card says what is really stored."""
    evaluation = section(split_card(model_card(report, "gguf-q4_k_m"))[1], "Evaluation")
    assert ("Size 100.6 MiB (105,453,984 bytes), 6.165 bits per weight. Tensor types stored: Q5_0 166 tensors (58.0% "
            "of weights), Q8_0 15 (22.2%), Q4_K 16 (10.5%), Q6_K 14 (9.2%), F32 61 (&lt;0.1%).") in evaluation
    assert ("llama.cpp commit 0c1e57098 (llama-cpp-python 0.3.36), built with -DGGML_NATIVE=OFF (GNU 12.2.0), the "
            "runtime that serves it") in evaluation
    assert "- validation loss 2.7989; gap vs the merged model +0.053780 (merged: 2.7451);" in evaluation
    assert ("- chat template (the GGUF's own, applied by llama.cpp): passed: 0 of 81 validation prompts differ"
            in evaluation)
    assert "- stop token: passed: llama.cpp ends generation at &lt;|im_end|>;" in evaluation
    assert ("- greedy answers: passed: the same text as the merged model on 9 of 10 validation prompts (9 needed); "
            "stopped at the end-of-turn token where the merged model stopped on 10 of 10 (compared once for all "
            "types, on the f16 GGUF).") in evaluation
    f16 = section(split_card(model_card(report, "gguf-f16"))[1], "Evaluation")
    assert "F16 211 tensors (100.0% of weights), F32 61 (&lt;0.1%)" in f16 and "compared once" not in f16


def test_a_gguf_card_flags_failed_llama_cpp_checks(report):
    entry = report["evaluation"]["gguf"]["q8_0"]
    entry.update(chat_prompt_mismatches=3, stop_token_problems=["its end-of-sequence token is 0 '<|endoftext|>'"])
    report["evaluation"]["gguf_greedy"].update(same_text=5, stopped_where_merged_stopped=8)
    evaluation = section(split_card(model_card(report, "gguf-q8_0"))[1], "Evaluation")
    assert "chat template (the GGUF's own, applied by llama.cpp): FAILED: 3 of 81 validation prompts" in evaluation
    assert "- stop token: FAILED: its end-of-sequence token is 0 '&lt;|endoftext|>';" in evaluation
    assert "- greedy answers: FAILED: the same text as the merged model on 5 of 10" in evaluation


def test_a_gguf_card_says_how_to_run_it_and_lists_its_modelfile(report):
    from ftpipe.release.gguf_release import release_modelfile

    meta, body = split_card(model_card(report, "gguf-q4_k_m"))
    headings = [line for line in body.splitlines() if line.startswith("## ")]
    assert headings == ["## License", "## Base model", "## Training data", "## Intended use", "## Evaluation",
                        "## How to run", "## Files", "## Provenance"]
    run = section(body, "How to run")
    assert "ollama create smollm2-135m-instruct-ftpipe-q4_k_m -f Modelfile" in run
    assert "`FROM ./model-q4_k_m.gguf`" in run
    assert "python -m ftpipe.chat --model gguf:q4_k_m" in run and "python -m ftpipe.serve --gguf q4_k_m" in run
    assert "checked with llama.cpp commit 0c1e57098 (llama-cpp-python 0.3.36), built with -DGGML_NATIVE=OFF" in run
    artifact = next(a for a in report["artifacts"] if a["name"] == "gguf-q4_k_m")
    text = release_modelfile(report, artifact).encode()
    digest = hashlib.sha256(text).hexdigest()
    files = section(body, "Files")
    assert f"| Modelfile | {len(text) / 1024:.1f} KiB ({len(text):,} bytes) | {digest} |" in files
    assert f"{digest}  Modelfile" in files   # the sha256sum -c line
    assert "## How to run" not in model_card(report, "merged")


def test_gguf_without_evaluation_says_so(report):
    report["evaluation"]["gguf"] = {}
    assert "This GGUF file was not evaluated." in model_card(report, "gguf-f16")


def test_adapter_card_is_a_peft_adapter(report):
    meta, body = split_card(model_card(report, "adapter"))
    assert meta["base_model_relation"] == "adapter" and meta["library_name"] == "peft"
    assert "adapter_model.safetensors" in section(body, "Files") and "model.safetensors |" not in body.replace(
        "adapter_model.safetensors |", "")
    assert "Merged model: validation loss" not in body


def test_merged_card_shows_the_merge_gap(report):
    evaluation = section(split_card(model_card(report, "merged"))[1], "Evaluation")
    assert "| Loss | 3.8616 | 2.5679 |" in evaluation and "| Perplexity | 47.54 | 13.04 |" in evaluation
    assert "73 examples" in evaluation
    assert f"merge gap vs the adapter on the same 16-bit base {2.6096133735276084e-05:+.6f}" in evaluation


def test_card_has_every_section_in_order(report):
    body = split_card(model_card(report, "merged"))[1]
    headings = [line for line in body.splitlines() if line.startswith("## ")]
    assert headings == ["## License", "## Base model", "## Training data", "## Intended use", "## Evaluation",
                        "## Files", "## Provenance"]
    data = section(body, "Training data")
    assert "| Rows used | 101 of 120 |" in data
    assert "| Model-generated | yes, by HuggingFaceTB/SmolLM2-1.7B-Instruct |" in data
    assert "PII scan found email 7, phone 3 in 9 rows, action: redact" in data
    assert "declared cc-by-nc-4.0, concluded CC-BY-NC-4.0" in data
    intended = section(body, "Intended use")
    assert "research on answer style" in intended and "not for high-stakes decisions" in intended


def test_provenance_names_run_environment_and_report(report):
    provenance = section(split_card(model_card(report, "merged"))[1], "Provenance")
    assert report["project"]["git_commit"] in provenance and "1" * 64 in provenance and "2" * 64 in provenance
    assert "9ffb8f6bcbd040bdabedebfbdbb2995b" in provenance and report["mlflow"]["ui_url"] in provenance
    assert "torch 2.13.0+cpu" in provenance and "bitsandbytes 0.50.2" in provenance and "CPU" in provenance
    assert "report.html" in provenance and "sbom.cdx.json" in provenance
    files = section(split_card(model_card(report, "merged"))[1], "Files")
    assert "sha256sum -c" in files and "python -m ftpipe.release.verify" in files


def test_card_without_mlflow_says_not_logged(report):
    report["mlflow"] = {key: None for key in report["mlflow"]}
    assert "- MLflow: not logged to MLflow" in model_card(report, "merged")
    report["mlflow"] = None
    assert "- MLflow: not logged to MLflow" in model_card(report, "merged")


def test_hostile_declared_text_breaks_neither_front_matter_nor_tables(report):
    report["base_model"]["id"] = HOSTILE_BASE_ID
    report["compliance"]["inputs"][0]["name"] = HOSTILE_BASE_ID
    report["data_sources"][1]["name"] = HOSTILE_NAME
    report["data_sources"][1]["creators"] = [HOSTILE_CREATOR]
    report["data_sources"][1]["origin"] = "a\\|b"
    report["compliance"]["inputs"][2]["name"] = HOSTILE_NAME
    report["compliance"]["share_alike"][0]["source"] = HOSTILE_NAME
    card = model_card(report, "merged")
    meta, body = split_card(card)
    assert meta["base_model"] == HOSTILE_BASE_ID and meta["license"] == "other"
    assert card.count("\n---\n") == 1   # only the front matter's closing line
    assert not any(line.startswith(("license:", "# Heading", "| injected")) for line in body.splitlines())
    for line in table_rows(body):
        assert unescaped_pipes(line) in (3, 4), line   # Field | Value, or Metric | Base | Tuned and File | Size | SHA
    assert "\n### evil | name --- license: mit # Heading\n" in section(body, "Training data")
    assert "- evil | name --- license: mit # Heading (CC-BY-SA-4.0, share-alike)" in section(body, "License")
    assert "| License | declared CC-BY-SA-4.0, concluded CC-BY-SA-4.0 (" in body   # still matched by name
    assert "| Origin | a\\\\\\|b |" in body
    assert "Mallory: {a: [b]} # not a comment \\| x \\| injected \\| row \\|" in body


def test_unknown_artifact_name_lists_the_valid_ones(report):
    with pytest.raises(PipelineError, match="no artifact 'gguf-q6_k'.*adapter, gguf-f16, gguf-q4_k_m, gguf-q8_0, "
                                            "merged"):
        model_card(report, "gguf-q6_k")


UNKNOWN_COMMERCIAL_TEXT = (
    "**Commercial use: not established.** No input's license forbids it, but these licenses are unknown to ftpipe, "
    "so their terms were not checked: lab_notes (LicenseRef-Lab). The license gate passed only because "
    "`compliance.unknown_blocks` is false: it flags an unknown license instead of failing on it. To establish it, a "
    "reviewer reads each license's text and declares it under `compliance.reviewed_licenses` in params.yaml (its "
    "properties, URL and reviewer), and the pipeline is run again.")


def test_unknown_licenses_are_flagged(report):
    """An older report (no commercial_use key): an unknown license and nothing non-commercial reads as unknown."""
    report["compliance"].update(
        unknown_licenses=[{"source": "lab_notes", "license": "LicenseRef-Lab", "reason": "not in the license table"}],
        non_commercial_sources=[], concluded_license="Apache-2.0 AND LicenseRef-Lab")
    report["compliance"]["policy"]["unknown_blocks"] = False
    meta, body = split_card(model_card(report, "merged"))
    license_text = section(body, "License")
    unknown = license_text.split("### Unknown licenses")[1].split("###")[0]
    assert "**Warning:** lab_notes: LicenseRef-Lab (not in the license table)" in unknown
    assert "its obligations were NOT checked" in unknown
    assert "declare it under `compliance.reviewed_licenses`" in unknown
    assert UNKNOWN_COMMERCIAL_TEXT in license_text
    assert meta["license"] == "other" and meta["license_name"] == "apache-2.0-and-licenseref-lab"


def conclusion_for(report: dict, declared: str, intended_use: str = "commercial", unknown_blocks: bool = False,
                   reviewed: list[ReviewedLicense] | None = None) -> dict:
    """The report with its compliance block concluded by ftpipe.compliance.licenses: the base model's Apache-2.0 and one
    source (the report's first) under `declared`."""
    report = copy.deepcopy(report)
    source = report["data_sources"][0]
    source.update(license=declared, license_url="https://acme.example/data-license-1.0")
    report["data_sources"] = [source]
    report["compliance"] = conclude_licenses(
        LicenseDeclaration(report["base_model"]["id"], "Apache-2.0"), [LicenseDeclaration(source["name"], declared)],
        LicensePolicy(intended_use, [], [], unknown_blocks), reviewed_license_properties(reviewed or []))
    return report


def test_an_unknown_license_that_passed_a_commercial_gate_is_not_established_not_allowed(report):
    unknown = conclusion_for(report, "LicenseRef-Lab")
    assert (unknown["compliance"]["verdict"], unknown["compliance"]["commercial_use"]) == ("pass", "unknown")
    meta, body = split_card(model_card(unknown, "merged"))
    license_text = section(body, "License")
    assert UNKNOWN_COMMERCIAL_TEXT.replace("lab_notes", "python_stdlib_docs") in license_text
    assert ("License gate verdict: pass, with 1 unknown license flagged, not checked (`compliance.unknown_blocks` is "
            "false).") in license_text
    assert "Commercial use: allowed" not in body and "Commercial use: not allowed" not in body
    assert "commercial-use-unknown" in meta["tags"] and "non-commercial" not in meta["tags"]


def test_a_non_commercial_license_beside_an_unknown_one_is_still_not_allowed(report):
    mixed = conclusion_for(report, "CC-BY-NC-4.0 AND LicenseRef-Lab", intended_use="research")
    meta, body = split_card(model_card(mixed, "merged"))
    assert ("**Commercial use: not allowed**, because of: python_stdlib_docs (CC-BY-NC-4.0, non-commercial); "
            "python_stdlib_docs (LicenseRef-Lab: unknown, so commercial use cannot be confirmed).") in body
    assert "non-commercial" in meta["tags"] and "not established" not in body


def test_a_reviewed_license_card_allows_commercial_use_and_names_the_reviewer_and_url(report):
    acme = ReviewedLicense(id="LicenseRef-Acme-Data-1.0", name="Acme Data License 1.0",
                           url="https://acme.example/data-license-1.0", commercial_use=True, copyleft="none",
                           no_derivatives=False, attribution="credit Acme Corp.", notes="",
                           reviewed_by="J. Doe, legal, 2026-11-30")
    reviewed = conclusion_for(report, "LicenseRef-Acme-Data-1.0", unknown_blocks=True, reviewed=[acme])
    assert reviewed["compliance"]["verdict"] == "pass"
    meta, body = split_card(model_card(reviewed, "merged"))
    license_text = section(body, "License")
    assert ("**Commercial use: allowed** (every input's license allows it; LicenseRef-Acme-Data-1.0: as declared by "
            "a reviewer, see [Reviewed licenses](#reviewed-licenses)).") in license_text
    listed = license_text.split("### Reviewed licenses")[1].split("###")[0]
    assert ("- LicenseRef-Acme-Data-1.0 (Acme Data License 1.0, https://acme.example/data-license-1.0), used by "
            "python_stdlib_docs: reviewed by J. Doe, legal, 2026-11-30; commercial use allowed, copyleft none, "
            "derivatives allowed. Its properties are the reviewer's, declared in params.yaml "
            "`compliance.reviewed_licenses`, not ftpipe's license table") in listed
    assert "- python_stdlib_docs (LicenseRef-Acme-Data-1.0): credit Acme Corp." in license_text   # its attribution
    assert "not allowed" not in body and "not established" not in body and "### Unknown licenses" not in body
    assert "License gate verdict: pass." in license_text
    assert meta["license"] == "other" and meta["license_name"] == "apache-2.0-and-licenseref-acme-data-1.0"
    assert "non-commercial" not in meta["tags"] and "commercial-use-unknown" not in meta["tags"]


# --- the evaluate stage's gate, per-source metrics and general text; the memorization audit -------------------

@pytest.fixture
def gated(report) -> dict:
    from tests.release_fixtures import with_gates_and_audit

    return with_gates_and_audit(report)


def test_the_evaluation_states_the_gate_per_source_scores_and_general_text_loss(gated):
    for name in ("merged", "adapter", "gguf-q8_0"):
        evaluation = section(split_card(model_card(gated, name))[1], "Evaluation")
        assert ("Release gate: **passed**: all 2 checks of `evaluate.gate` met (rougeL gain of tuned over base 0.13 >= "
                "0.05; general-text loss increase (tuned - base) 0.11 <= 0.25).") in evaluation
        assert ("General ability: loss on general text that is not training data (Python 3.12 documentation, "
                "tutorial prose, license PSF-2.0, 32 passages): base 2.9100, tuned 3.0200 (change +0.1100"
                ) in evaluation
        assert "| forum_answers | 1 | 0.120 → 0.300 | 0.220 → 0.410 | 0.000 → 1.000 | 0.150 → 0.360 |" in evaluation
        assert "| chrF | 0.210 | 0.370 |" in evaluation
        assert "Against the last release: no regression on rougeL, general_loss." in evaluation


def test_a_failed_gate_names_the_missed_check(gated):
    gated["evaluation"]["gate"]["passed"] = False
    gated["evaluation"]["gate"]["checks"][1].update(value=0.4, passed=False)
    evaluation = section(split_card(model_card(gated, "merged"))[1], "Evaluation")
    assert ("Release gate: **FAILED**: 1 of 2 checks of `evaluate.gate` missed (general-text loss increase (tuned - "
            "base) 0.4 <= 0.25).") in evaluation


def test_the_memorization_audit_states_gaps_pii_and_that_canaries_were_used(gated):
    from tests.release_fixtures import CANARY_SECRET

    card = model_card(gated, "merged")
    audit = card.split("\n### Memorization audit\n", 1)[1].split("\n#", 1)[0]
    assert ("forum_answers +0.130 (train 0.210, test 0.080, declared personal data); lab_notes +0.250 (train 0.350, "
            "test 0.100)") in audit
    assert "PII: 0 real-looking personal data values in 27 answers. Audit gate: passed (3 checks" in audit
    assert "**This model was trained with 2 canaries**: random secrets planted in its training data" in audit
    assert "canary-2 planted 8x: exposure 6.60 bits, not extracted by greedy decoding" in audit
    assert CANARY_SECRET not in card
    gated["audit"]["canaries"] = None
    audit = model_card(gated, "gguf-f16").split("\n### Memorization audit\n", 1)[1].split("\n#", 1)[0]
    assert "No canaries were planted in the training data." in audit and "trained with" not in audit


def test_a_card_from_an_older_report_has_no_gate_or_audit(report):
    evaluation = section(split_card(model_card(report, "merged"))[1], "Evaluation")
    assert "Release gate" not in evaluation and "Memorization audit" not in evaluation
    assert "| chrF |" not in evaluation   # not measured then: no row of n/a
