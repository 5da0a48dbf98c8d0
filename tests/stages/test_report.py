"""The report stage: the compliance report, BOM, model cards and the release folder (stages/report.py),
on a small finished project (tests/release_fixtures.py): hashes match the disk, cards carry the concluded
license, the BOM validates, and a failure publishes nothing."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import read_json, sha256_file
from ftpipe.release.sbom import validate_sbom
from stages import report
from tests.release_fixtures import GGUF_TYPES, SOURCES, build_finished_project

RELEASE = Path("models/release")


@pytest.fixture
def released(in_tmp_project) -> dict:
    build_finished_project()
    report.main()
    return read_json(RELEASE / "report.json")


def test_report_hashes_match_the_files_on_disk(released):
    files = [file for artifact in released["artifacts"] for file in artifact["files"]]
    assert {file["path"] for file in files} >= {"models/adapter/adapter_model.safetensors",
                                               "models/merged/model.safetensors",
                                               *(f"models/gguf/model-{t}.gguf" for t in GGUF_TYPES)}
    for file in files:
        assert sha256_file(Path(file["path"])) == file["sha256"], file["path"]
        assert Path(file["path"]).stat().st_size == file["bytes"], file["path"]
    for source in released["data_sources"]:
        assert sha256_file(Path(source["file"])) == source["sha256"]
    # and every file of the release, by the standard tool
    done = subprocess.run(["sha256sum", "--check", "--strict", "--quiet", str(RELEASE / "MANIFEST.sha256")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = (RELEASE / "MANIFEST.sha256").read_text().splitlines()
    listed = {line.split("  ", 1)[1] for line in manifest}
    assert {"models/release/report.json", "models/release/report.html", "models/release/sbom.cdx.json",
            "models/release/merged/README.md", "models/release/gguf-q8_0/model-q8_0.gguf",
            *(f"models/release/gguf-{t}/Modelfile" for t in GGUF_TYPES)} <= listed


def test_release_folders_hold_each_artifact_with_its_card(released):
    for artifact in released["artifacts"]:
        folder = Path(artifact["release_folder"])
        names = {path.name for path in folder.iterdir()}
        modelfile = {"Modelfile"} if artifact["kind"] == "gguf" else set()
        assert names == {Path(file["path"]).name for file in artifact["files"]} | {"README.md"} | modelfile, folder
        for file in artifact["files"]:   # hard links: the release costs no disk
            assert (folder / Path(file["path"]).name).stat().st_ino == Path(file["path"]).stat().st_ino
    # PEFT's placeholder card is not released: ours replaces it
    adapter_card = (RELEASE / "adapter/README.md").read_text()
    assert "Model Card for Model ID" not in adapter_card and "CC-BY-NC-4.0" in adapter_card


def test_cards_carry_the_concluded_license_not_a_default(released):
    for name in ("merged", *(f"gguf-{t}" for t in GGUF_TYPES)):
        card = (RELEASE / name / "README.md").read_text()
        front = yaml.safe_load(card.split("---")[1])
        assert front["license"] == "other" and front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert "Commercial use: not allowed" in card and "lab_notes" in card and "CC-BY-NC-4.0" in card
        assert "forum_answers" in card and "CC-BY-SA-4.0" in card   # share-alike travels to every card
    gguf_card = (RELEASE / "gguf-q8_0/README.md").read_text()
    q8 = next(a for a in released["artifacts"] if a["name"] == "gguf-q8_0")["files"][0]
    assert q8["sha256"] in gguf_card


def test_report_collects_sources_stages_training_and_evaluation(released):
    compliance = released["compliance"]
    assert compliance["verdict"] == "pass" and compliance["commercial_use_allowed"] is False
    assert compliance["concluded_license"] == "Apache-2.0 AND CC-BY-NC-4.0 AND CC-BY-SA-4.0 AND PSF-2.0"
    sources = {source["name"]: source for source in released["data_sources"]}
    assert list(sources) == list(SOURCES)
    forum = sources["forum_answers"]
    assert (forum["rows_in"], forum["rows_kept"], forum["rows_rejected"]) == (10, 8, 2)
    assert forum["rejected_by_reason"] == {"answer_too_short": 2}
    assert forum["pii"] == {"action": "redact", "rows": 3, "found": {"email": 2, "phone": 1}}
    assert forum["personal_data"] is True and forum["license"] == "CC-BY-SA-4.0"
    assert sources["lab_notes"]["generated_by"] == "HuggingFaceTB/SmolLM2-1.7B-Instruct"
    stages = {stage["name"]: stage for stage in released["stages"]}
    assert list(stages) == ["ingest", "compliance", "train", "merge", "quantize"]   # dvc.yaml's order
    assert stages["quantize"]["deps"][0]["path"] == "models/merged"
    assert stages["quantize"]["outs"][0]["md5"].endswith(".dir")
    compliance_run = read_json(Path("data/compliance/provenance.json"))["mlflow"]["run_id"]
    assert compliance_run and stages["compliance"]["mlflow_run_id"] == compliance_run
    assert released["training"]["params"]["train.lora.r"] == 16
    assert released["training"]["environment"]["packages"]["peft"] == "0.21.0"
    assert released["evaluation"]["tuned"]["rougeL"] == 0.24 and set(released["evaluation"]["gguf"]) == set(GGUF_TYPES)
    mlflow = released["mlflow"]
    assert mlflow["pipeline_run_id"] and mlflow["report_run_id"]
    assert mlflow["ui_url"].endswith(f"/runs/{mlflow['pipeline_run_id']}")
    assert released["project"]["compliance_conclusion_sha256"] == sha256_file(Path("data/compliance/conclusion.json"))


def test_bom_validates_and_html_markdown_are_written(released):
    sbom = json.loads((RELEASE / "sbom.cdx.json").read_text())
    validate_sbom(sbom)
    assert sbom["specVersion"] == "1.6"
    assert "Reviewer" in (RELEASE / "report.md").read_text() or "reviewer" in (RELEASE / "report.md").read_text()
    assert 'id="data-sources"' in (RELEASE / "report.html").read_text()
    metrics = read_json(Path("metrics/report.json"))
    assert metrics["artifacts"] == 2 + len(GGUF_TYPES) and metrics["commercial_use_allowed"] is False


def test_a_failure_keeps_the_previous_release(released):
    before = (RELEASE / "report.json").read_bytes()
    Path("models/merged/provenance.json").unlink()
    with pytest.raises(PipelineError, match="models/merged/provenance.json: file not found"):
        report.main()
    assert (RELEASE / "report.json").read_bytes() == before
    assert not list(Path("models").glob(".release.tmp-*"))


def test_pii_found_in_a_source_declared_without_personal_data_is_reported(in_tmp_project, capsys):
    """The declaration is what a reviewer signs off on: the report names where the data contradicts it."""
    build_finished_project()
    summary = read_json(Path("data/clean/summary.json"))
    undeclared = next(name for name in SOURCES if name != "forum_answers")   # declared personal_data: false
    summary["sources"][undeclared]["pii"] = {"action": "redact", "rows": 2, "found": {"email": 3}}
    Path("data/clean/summary.json").write_text(json.dumps(summary), encoding="utf-8")
    report.main()
    released = read_json(RELEASE / "report.json")
    assert released["declaration_mismatches"] == [{
        "source": undeclared, "field": "personal_data", "declared": False, "found": {"email": 3}, "rows": 2,
        "action": "redact", "message": f"data source {undeclared!r} is declared personal_data: false, but 2 rows held "
                                       f"personal data (email (3); redacted by clean). Correct the declaration "
                                       f"(personal_data: true and its legal basis) or the data."}]
    assert f"warning: data source {undeclared!r} is declared personal_data: false" in capsys.readouterr().err
    assert read_json(Path("metrics/report.json"))["declaration_mismatches"] == 1


def test_a_release_whose_declarations_hold_has_no_mismatch(released):
    assert released["declaration_mismatches"] == []   # forum_answers has PII and declares it


def test_a_declaration_mismatch_is_shown_as_a_warning_in_both_documents(in_tmp_project):
    build_finished_project()
    summary = read_json(Path("data/clean/summary.json"))
    undeclared = next(name for name in SOURCES if name != "forum_answers")
    summary["sources"][undeclared]["pii"] = {"action": "reject", "rows": 1, "found": {"phone": 1}}
    Path("data/clean/summary.json").write_text(json.dumps(summary), encoding="utf-8")
    report.main()
    markdown, page = (RELEASE / "report.md").read_text(), (RELEASE / "report.html").read_text()
    assert (f"Declaration mismatch: data source '{undeclared}' is declared personal_data: false, but 1 row held "
            f"personal data (phone (1); rejected by clean)") in markdown
    assert f"Declaration mismatch: data source &#x27;{undeclared}&#x27; is declared personal_data: false" in page


def test_each_gguf_folder_holds_an_ollama_modelfile_for_its_gguf(released):
    from ftpipe.gguf.modelfile import CHATML_TEMPLATE, parse_modelfile
    from tests.release_fixtures import SMOLLM2_DEFAULT_SYSTEM

    sbom = json.loads((RELEASE / "sbom.cdx.json").read_text())
    bom_files = {file["name"]: file["hashes"][0]["content"] for component in sbom["components"]
                 for file in component.get("components", [])}
    for gguf_type in GGUF_TYPES:
        path = RELEASE / f"gguf-{gguf_type}/Modelfile"
        commands = parse_modelfile(path.read_text())
        assert commands[0] == ("model", f"./model-{gguf_type}.gguf")
        assert ("template", CHATML_TEMPLATE) in commands and ("system", SMOLLM2_DEFAULT_SYSTEM) in commands
        assert [value for name, value in commands if name == "stop"] == ["<|im_end|>"]
        (license_text,) = [value for name, value in commands if name == "license"]
        assert license_text.startswith(released["compliance"]["concluded_license"] + "\n")
        assert "lab_notes (CC-BY-NC-4.0)" in license_text
        assert "forum_answers (CC-BY-SA-4.0, share-alike)" in license_text
        assert bom_files[path.as_posix()] == sha256_file(path)
    assert released["artifacts"][-1]["chat_template"].startswith("{% for message in messages %}")


def test_the_report_carries_the_quantize_stage_checks(released):
    evaluation = released["evaluation"]
    q4 = evaluation["gguf"]["q4_k_m"]
    assert set(q4["types"]) == {"Q8_0", "Q5_0", "Q6_K", "Q4_K", "F32"} and q4["bits_per_weight"] > 0
    assert (q4["chat_prompts_compared"], q4["chat_prompt_mismatches"], q4["stop_token_problems"]) == (4, 0, [])
    assert evaluation["gguf_greedy"]["same_text"] == 2 and len(evaluation["gguf_greedy"]["pairs"]) == 3
    assert evaluation["llama_cpp"]["llama_cpp_commit"] == "0c1e57098"
    assert evaluation["gguf_converter"]["package"] == "llama.cpp convert_hf_to_gguf.py"
    assert evaluation["end_of_turn_tokens"] == ["<|im_end|>"]
    card = (RELEASE / "gguf-q4_k_m/README.md").read_text()
    assert "Q8_0 2 tensors" in card and "Q4_K 1 (" in card and "ollama create" in card
    assert "the same text as the merged model on 2 of 3 validation prompts (2 needed)" in card
    markdown = (RELEASE / "report.md").read_text()
    assert "llama.cpp commit 0c1e57098 (llama-cpp-python 0.3.36), built with -DGGML_NATIVE=OFF" in markdown


def test_a_file_that_is_not_a_gguf_fails_the_report_naming_it(in_tmp_project):
    build_finished_project()
    Path("models/gguf/model-q8_0.gguf").write_bytes(b"not a GGUF" * 100)
    with pytest.raises(PipelineError, match=r"models/gguf/model-q8_0.gguf: not a readable GGUF file"):
        report.main()


def test_the_side_by_side_page_is_released_hashed_and_linked(released):
    page = RELEASE / "evaluation/side_by_side.html"
    source = Path("data/evaluation/side_by_side.html")
    assert page.read_bytes() == source.read_bytes() and page.stat().st_ino != source.stat().st_ino   # a copy
    assert released["evaluation"]["side_by_side"] == {
        "source": source.as_posix(), "sha256": sha256_file(source), "path": page.as_posix(),
        "link": "evaluation/side_by_side.html"}
    manifest = dict(reversed(line.split("  ", 1)) for line in (RELEASE / "MANIFEST.sha256").read_text().splitlines())
    assert manifest[page.as_posix()] == sha256_file(page)
    assert '<a href="evaluation/side_by_side.html">side-by-side page</a>' in (RELEASE / "report.html").read_text()
    assert "[side-by-side page](evaluation/side_by_side.html)" in (RELEASE / "report.md").read_text()


def test_the_report_carries_the_evaluate_gates_and_the_audit(released):
    from tests.release_fixtures import AUDIT, DRIFT, EVALUATE_GATE, GENERAL_TEXT, HARNESS, TASK

    evaluation = released["evaluation"]
    assert (evaluation["task"], evaluation["general_text"], evaluation["gate"]) == (TASK, GENERAL_TEXT, EVALUATE_GATE)
    assert (evaluation["drift"], evaluation["harness"]) == (DRIFT, HARNESS)
    assert evaluation["test_examples_sha256"] == "e" * 64 and evaluation["tuned"]["chrF"] == 0.37
    audit = released["audit"]
    assert (audit["extraction"], audit["pii"], audit["gate"]) == (AUDIT["extraction"], AUDIT["pii"], AUDIT["gate"])
    assert audit["canaries"] == AUDIT["canaries"] and audit["metrics_file"] == "metrics/audit.json"
    assert audit["verdict_sha256"] == sha256_file(Path("data/audit/gate.json"))
    metrics = read_json(Path("metrics/report.json"))
    assert metrics["evaluate_gate_passed"] and metrics["audit_gate_passed"] and metrics["canaries_used"]
    markdown = (RELEASE / "report.md").read_text()
    assert "## Memorization audit" in markdown and "this model was trained with 2 canaries" in markdown
    card = (RELEASE / "merged/README.md").read_text()
    assert "Release gate: **passed**" in card and "**This model was trained with 2 canaries**" in card
    sbom = json.loads((RELEASE / "sbom.cdx.json").read_text())
    merged = {prop["name"]: prop["value"] for prop in sbom["metadata"]["component"]["properties"]}
    assert merged["ftpipe:audit:canaries_used"] == "true" and merged["ftpipe:evaluate:gate:passed"] == "true"


def test_no_release_file_holds_a_canary_secret(in_tmp_project):
    """The audit never writes a secret; were one in metrics/audit.json, the report keeps only each canary's numbers."""
    from tests.release_fixtures import CANARY_SECRET

    build_finished_project()
    audit = read_json(Path("metrics/audit.json"))
    audit["canaries"]["results"][0]["secret"] = CANARY_SECRET
    audit["canaries"]["secrets"] = [CANARY_SECRET]
    Path("metrics/audit.json").write_text(json.dumps(audit), encoding="utf-8")
    report.main()
    released = read_json(RELEASE / "report.json")
    assert set(released["audit"]["canaries"]["results"][0]) == {"id", "repeats", "exposure", "max_exposure", "rank",
                                                                "extracted"}
    for path in RELEASE.rglob("*"):
        if path.is_file() and path.suffix != ".gguf":
            assert CANARY_SECRET.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("missing, named", [("metrics/audit.json", "metrics/audit.json: not found"),
                                            ("data/evaluation/side_by_side.html",
                                             "data/evaluation/side_by_side.html: not found")])
def test_a_missing_audit_or_side_by_side_page_fails_naming_it(in_tmp_project, missing, named):
    build_finished_project()
    Path(missing).unlink()
    with pytest.raises(PipelineError, match=named):
        report.main()
    assert not RELEASE.exists()


def test_the_report_holds_the_baseline_a_later_runs_drift_is_measured_against(released):
    from ftpipe.evaluation.drift import drift_metrics

    baseline = released["evaluation"]["baseline_metrics"]
    assert baseline == drift_metrics(read_json(Path("metrics/evaluate.json")))
    assert baseline["metrics"]["rougeL"] == 0.24 and baseline["metrics"]["general_loss"] == 3.02
    assert baseline["measured_on"] == {"test_examples_sha256": "e" * 64, "general_text_sha256": "f" * 64}
