"""The CycloneDX 1.6 ML-BOM: built from the example report, validated offline, and carrying what an auditor needs."""
import copy
import json
import re
from pathlib import Path

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.release.sbom import SBOM_FILE, build_sbom, validate_sbom

REPORT = json.loads((Path(__file__).parents[1] / "fixtures" / "report_example.json").read_text(encoding="utf-8"))


@pytest.fixture
def report():
    return copy.deepcopy(REPORT)


@pytest.fixture
def minimal_report(report):
    """One source, no GGUF, MLflow unavailable, and a license the gate could not recognize."""
    report["data_sources"] = report["data_sources"][:1]
    report["compliance"]["inputs"] = report["compliance"]["inputs"][:2]
    report["compliance"]["inputs"][1].update(declared="other", chosen="LicenseRef-Unknown")
    report["compliance"].update(concluded_license="Apache-2.0 AND LicenseRef-Unknown", unknown_licenses=["other"],
                                share_alike=[], non_commercial_sources=[], notes=[], attribution=[])
    report["data_sources"][0].update(license="other", license_url=None, creators=[])
    report["mlflow"] = {key: None for key in report["mlflow"]}
    report["artifacts"] = [artifact for artifact in report["artifacts"] if artifact["kind"] != "gguf"]
    report["evaluation"]["gguf"] = {}
    report["training"]["environment"] = {}
    for stage in report["stages"]:
        stage["mlflow_run_id"] = None
    return report


def by_ref(sbom):
    """Every element with a bom-ref, the BOM's subject (metadata.component) included."""
    return {component["bom-ref"]: component for component in [sbom["metadata"]["component"], *sbom["components"]]}


def properties(component, name):
    return [prop["value"] for prop in component.get("properties", []) if prop["name"] == name]


def test_the_example_report_gives_a_valid_deterministic_bom(report):
    sbom = build_sbom(report)
    validate_sbom(sbom)
    assert SBOM_FILE == "sbom.cdx.json"
    assert (sbom["bomFormat"], sbom["specVersion"], sbom["version"]) == ("CycloneDX", "1.6", 1)
    assert re.fullmatch(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", sbom["serialNumber"])
    assert sbom["metadata"]["timestamp"] == report["created_at"]
    assert [tool["name"] for tool in sbom["metadata"]["tools"]["components"]] == ["ftpipe"]
    again = build_sbom(copy.deepcopy(REPORT))
    assert again == sbom and json.dumps(again) == json.dumps(sbom)
    assert report == REPORT, "building must not change the report"


def test_the_serial_number_follows_the_artifacts_sources_and_time(report):
    serial = build_sbom(report)["serialNumber"]
    report["artifacts"][-1]["files"][0]["sha256"] = "0" * 64
    assert build_sbom(report)["serialNumber"] != serial
    changed_source = copy.deepcopy(REPORT)
    changed_source["data_sources"][0]["sha256"] = "0" * 64
    assert build_sbom(changed_source)["serialNumber"] != serial
    later = copy.deepcopy(REPORT)
    later["created_at"] = "2026-11-24T12:00:00+00:00"
    assert build_sbom(later)["serialNumber"] != serial


@pytest.mark.parametrize("breakage, path, complaint", [
    (lambda sbom: sbom["components"][0].update(type="model"), r"\$\.components\[0\]\.type", "'model' is not one of"),
    (lambda sbom: sbom["metadata"]["component"].update(colour="red"), r"\$\.metadata\.component",
     r"Additional properties are not allowed \('colour'"),
    (lambda sbom: sbom["components"][1]["hashes"][0].update(content="not-a-digest"),
     r"\$\.components\[1\]\.hashes\[0\]\.content", "does not match"),
    (lambda sbom: sbom.update(version="1"), r"\$\.version", "'1' is not of type 'integer'"),
    # an id outside the schema's SPDX enum is why LicenseRef- ids are written as expressions
    (lambda sbom: sbom["components"][0].update(licenses=[{"license": {"id": "LicenseRef-Unknown"}}]),
     r"\$\.components\[0\]\.licenses", "LicenseRef-Unknown"),
])
def test_a_broken_bom_fails_naming_the_path(report, breakage, path, complaint):
    sbom = build_sbom(report)
    breakage(sbom)
    with pytest.raises(PipelineError) as caught:
        validate_sbom(sbom)
    message = str(caught.value)
    assert "CycloneDX 1.6" in message and "ftpipe/release/sbom.py" in message
    assert re.search(path, message) and re.search(complaint, message), message


def test_duplicate_and_dangling_bom_refs_fail(report):
    sbom = build_sbom(report)
    sbom["components"][1]["bom-ref"] = "model:base"
    with pytest.raises(PipelineError, match=r"bom-ref 'model:base' is used by more than one element"):
        validate_sbom(sbom)
    sbom = build_sbom(report)
    sbom["dependencies"][0]["dependsOn"].append("data:nowhere")
    with pytest.raises(PipelineError, match=r"\$\.dependencies\[0\]\.dependsOn\[4\]: 'data:nowhere' is the bom-ref "
                                            r"of nothing"):
        validate_sbom(sbom)


def test_one_data_component_per_source_with_its_hash_and_canonical_license(report):
    components = by_ref(build_sbom(report))
    chosen = {entry["name"]: entry["chosen"] for entry in report["compliance"]["inputs"]}
    data = [component for component in components.values() if component["type"] == "data"]
    assert [component["name"] for component in data] == [source["name"] for source in report["data_sources"]]
    for source in report["data_sources"]:
        component = components[f"data:{source['name']}"]
        assert component["hashes"] == [{"alg": "SHA-256", "content": source["sha256"]}]
        assert component["licenses"][0]["license"]["id"] == chosen[source["name"]]
        assert {"type": "license", "url": source["license_url"]} in component["externalReferences"]
        assert properties(component, "ftpipe:license:declared") == [source["license"]]
        dataset = component["data"][0]
        assert (dataset["type"], dataset["name"]) == ("dataset", source["name"])
        assert [owner["organization"]["name"] for owner in dataset["governance"]["owners"]] == source["creators"]
        rows = {prop["name"]: prop["value"] for prop in dataset["contents"]["properties"]}
        assert rows["ftpipe:rows_kept"] == str(source["rows_kept"])
        assert rows["ftpipe:rows_rejected"] == str(source["rows_rejected"])
    lab_notes = components["data:lab_notes"]
    assert lab_notes["licenses"] == [{"license": {"id": "CC-BY-NC-4.0", "acknowledgement": "concluded"}}]
    assert properties(lab_notes, "ftpipe:model_generated") == ["true"]
    assert properties(lab_notes, "ftpipe:generated_by") == ["HuggingFaceTB/SmolLM2-1.7B-Instruct"]
    forum = components["data:forum_answers"]
    assert forum["licenses"][0]["license"]["acknowledgement"] == "declared"
    assert forum["data"][0]["classification"] == "personal data"
    assert forum["data"][0]["contents"]["url"] == "https://example.org/forum-dump-2026-10.jsonl"
    assert forum["data"][0]["sensitiveData"][0].startswith("personal data; legal basis: GDPR Art. 6(1)(f)")
    assert any(line.startswith("email: 7 found") for line in forum["data"][0]["sensitiveData"])
    assert properties(forum, "ftpipe:pii:found:phone") == ["3"]


def test_the_merged_model_carries_the_concluded_license_and_a_model_card(report):
    sbom = build_sbom(report)
    merged = sbom["metadata"]["component"]
    assert merged["bom-ref"] == "model:merged" and merged["type"] == "machine-learning-model"
    assert "model:merged" not in [component["bom-ref"] for component in sbom["components"]]
    assert merged["licenses"] == [{"expression": report["compliance"]["concluded_license"],
                                   "acknowledgement": "concluded"}]
    card = merged["modelCard"]
    parameters = card["modelParameters"]
    assert (parameters["approach"], parameters["task"]) == ({"type": "supervised"}, "text-generation")
    assert (parameters["architectureFamily"], parameters["modelArchitecture"]) == ("llama", "LlamaForCausalLM")
    data_refs = [ref for ref, component in by_ref(sbom).items() if component["type"] == "data"]
    assert [dataset["ref"] for dataset in parameters["datasets"]] == data_refs and len(data_refs) == 3
    metrics = {(metric["type"], metric["slice"]): metric["value"]
               for metric in card["quantitativeAnalysis"]["performanceMetrics"]}
    tuned, base = report["evaluation"]["tuned"], report["evaluation"]["base"]
    assert metrics[("ROUGE-L", "test split (73 examples), fine-tuned model")] == str(tuned["rougeL"])
    assert metrics[("loss", "test split (73 examples), fine-tuned model")] == str(tuned["loss"])
    assert metrics[("perplexity", "test split (73 examples), base model, for comparison")] == str(base["perplexity"])
    assert "intended use: research" in card["considerations"]["useCases"]
    assert properties(merged, "ftpipe:compliance:verdict") == ["pass"]
    assert properties(merged, "ftpipe:compliance:commercial_use_allowed") == ["false"]
    assert properties(merged, "ftpipe:git:commit") == [report["project"]["git_commit"]]
    assert properties(merged, "ftpipe:mlflow:pipeline_run_id") == [report["mlflow"]["pipeline_run_id"]]
    merged_files = next(artifact["files"] for artifact in report["artifacts"] if artifact["name"] == "merged")
    assert [(file["name"], file["hashes"][0]["content"]) for file in merged["components"]] == \
        [(file["path"], file["sha256"]) for file in merged_files]


def test_the_base_model_and_the_artifacts(report):
    components = by_ref(build_sbom(report))
    base = components["model:base"]
    assert (base["name"], base["version"]) == (report["base_model"]["id"], report["base_model"]["revision"])
    assert base["licenses"] == [{"license": {"id": "Apache-2.0", "acknowledgement": "declared"}}]
    assert base["hashes"][0]["content"] == report["base_model"]["observed"]["file_sha256"]
    assert properties(base, "ftpipe:digest") == [report["base_model"]["digest"]]
    assert [author["name"] for author in base["authors"]] == report["base_model"]["creators"]
    ggufs = [artifact for artifact in report["artifacts"] if artifact["kind"] == "gguf"]
    assert len(ggufs) == 3
    for artifact in ggufs:
        component = components[f"model:{artifact['name']}"]
        assert component["hashes"] == [{"alg": "SHA-256", "content": artifact["files"][0]["sha256"]}]
        assert component["licenses"][0]["expression"] == report["compliance"]["concluded_license"]
    adapter = components["model:adapter"]
    assert properties(adapter, "ftpipe:training:params:train.lora.r") == ["16"]
    assert len(adapter["components"]) == 2 and all(file["type"] == "file" for file in adapter["components"])


def test_dependencies_link_data_and_base_to_adapter_merged_and_gguf(report):
    dependencies = {entry["ref"]: entry.get("dependsOn") for entry in build_sbom(report)["dependencies"]}
    assert dependencies == {
        "model:adapter": ["model:base", "data:python_stdlib_docs", "data:forum_answers", "data:lab_notes"],
        "model:merged": ["model:base", "model:adapter"],
        "model:gguf-f16": ["model:merged", "runtime:llama.cpp"],
        "model:gguf-q8_0": ["model:merged", "runtime:llama.cpp"],
        "model:gguf-q4_k_m": ["model:merged", "runtime:llama.cpp"],
    }


def test_training_packages_are_libraries_with_pypi_purls(report):
    libraries = {component["name"]: component for component in build_sbom(report)["components"]
                 if component["type"] == "library" and component["bom-ref"].startswith("pkg:pypi/")}
    assert set(libraries) == set(report["training"]["environment"]["packages"])
    for name, component in libraries.items():
        assert component["purl"] == component["bom-ref"] == f"pkg:pypi/{name}@{component['version'].split('+')[0]}"
    assert libraries["torch"]["purl"] == "pkg:pypi/torch@2.13.0" and libraries["torch"]["version"] == "2.13.0+cpu"
    assert properties(libraries["torch"], "ftpipe:pypi:local_version") == ["cpu"]
    assert properties(libraries["peft"], "ftpipe:pypi:local_version") == []


def test_a_minimal_report_still_validates(minimal_report):
    sbom = build_sbom(minimal_report)
    validate_sbom(sbom)
    components = by_ref(sbom)
    merged = components["model:merged"]
    assert merged["licenses"] == [{"expression": "Apache-2.0 AND LicenseRef-Unknown", "acknowledgement": "concluded"}]
    assert not [prop for prop in merged["properties"] if prop["name"].startswith("ftpipe:mlflow:")]
    assert [ref for ref in components if ref.startswith("model:gguf")] == []
    assert [component for component in sbom["components"] if component["type"] == "library"] == []
    source = components["data:python_stdlib_docs"]
    assert source["licenses"] == [{"expression": "LicenseRef-Unknown", "acknowledgement": "concluded"}]
    assert "externalReferences" not in source and "authors" not in source
    assert merged["modelCard"]["modelParameters"]["datasets"] == [{"ref": "data:python_stdlib_docs"}]
    assert {entry["ref"]: entry["dependsOn"] for entry in sbom["dependencies"]} == {
        "model:adapter": ["model:base", "data:python_stdlib_docs"], "model:merged": ["model:base", "model:adapter"]}


def test_a_single_spdx_license_is_written_as_an_id(report):
    report["compliance"]["concluded_license"] = "Apache-2.0"
    sbom = build_sbom(report)
    validate_sbom(sbom)
    assert sbom["metadata"]["component"]["licenses"] == [{"license": {"id": "Apache-2.0",
                                                                      "acknowledgement": "concluded"}}]


def test_a_report_without_a_merged_model_is_refused(report):
    report["artifacts"] = [artifact for artifact in report["artifacts"] if artifact["kind"] != "merged-model"]
    with pytest.raises(PipelineError, match="expected one 'merged-model' artifact"):
        build_sbom(report)


def test_the_llama_cpp_runtime_is_a_component_with_its_build(report):
    sbom = build_sbom(report)
    runtime = by_ref(sbom)["runtime:llama.cpp"]
    assert (runtime["type"], runtime["name"], runtime["version"]) == ("library", "llama.cpp", "0c1e57098")
    assert runtime["purl"] == "pkg:github/ggml-org/llama.cpp@0c1e57098"
    assert properties(runtime, "ftpipe:llama_cpp_python:version") == ["0.3.36"]
    assert properties(runtime, "ftpipe:build:cmake_args") == ["-DGGML_NATIVE=OFF"]
    assert properties(runtime, "ftpipe:build:compiler") == ["GNU 12.2.0"]
    assert properties(runtime, "ftpipe:build:wheel_sha256") == [report["evaluation"]["llama_cpp"]["wheel_sha256"]]
    assert properties(runtime, "ftpipe:system_info")[0].startswith("CPU : SSE3 = 1")
    report["evaluation"]["llama_cpp"] = {"package_version": "0.3.36"}   # a build record without the commit
    sbom = build_sbom(report)
    validate_sbom(sbom)
    runtime = by_ref(sbom)["runtime:llama.cpp"]
    assert "version" not in runtime and "purl" not in runtime
    assert properties(runtime, "ftpipe:llama_cpp_python:version") == ["0.3.36"]


def test_gguf_components_carry_their_tensor_mix_checks_and_modelfile(report):
    from ftpipe.release.gguf_release import modelfile_facts

    components = by_ref(build_sbom(report))
    q4 = components["model:gguf-q4_k_m"]
    assert properties(q4, "ftpipe:bits_per_weight") == ["6.165"]
    assert properties(q4, "ftpipe:tensor_mix") == [
        "Q5_0 166 tensors (58.0% of weights), Q8_0 15 (22.2%), Q4_K 16 (10.5%), Q6_K 14 (9.2%), F32 61 (<0.1%)"]
    assert properties(q4, "ftpipe:tensor_types:Q4_K:tensors") == ["16"]
    assert properties(q4, "ftpipe:tensor_types:Q5_0:parameters") == ["78077952"]
    metrics = {metric["type"]: metric["value"]
               for metric in q4["modelCard"]["quantitativeAnalysis"]["performanceMetrics"]}
    assert metrics == {"validation_loss": "2.798927540510893", "loss_gap": "0.05378034005413856",
                       "tokenizer_mismatches": "0", "chat_prompt_mismatches": "0", "stop_token_problems": "0"}
    for artifact in [a for a in report["artifacts"] if a["kind"] == "gguf"]:
        expected = modelfile_facts(report, artifact)
        (modelfile,) = components[f"model:{artifact['name']}"]["components"]
        assert modelfile["name"] == expected["path"] == f"{artifact['release_folder']}/Modelfile"
        assert modelfile["hashes"] == [{"alg": "SHA-256", "content": expected["sha256"]}]
    merged = build_sbom(report)["metadata"]["component"]
    sbom_metrics = {metric["type"]: metric["value"]
                    for metric in merged["modelCard"]["quantitativeAnalysis"]["performanceMetrics"]}
    assert sbom_metrics["greedy answers with the same text"] == "9"
    assert sbom_metrics["greedy answers stopped where this model stopped"] == "10"


def test_a_hub_base_model_carries_its_commit_hub_page_and_files(report):
    from tests.release_fixtures import HUB_COMMIT, HUB_FILES_SHA256, with_hub_base

    sbom = build_sbom(with_hub_base(report))
    validate_sbom(sbom)
    base = by_ref(sbom)["model:base"]
    assert (base["name"], base["version"]) == ("tiny-org/tiny-llama", HUB_COMMIT)
    assert base["purl"] == f"pkg:huggingface/tiny-org/tiny-llama@{HUB_COMMIT}"
    assert {"type": "vcs", "url": f"https://huggingface.co/tiny-org/tiny-llama/tree/{HUB_COMMIT}",
            "comment": "the model's files at this commit on the Hugging Face Hub"} in base["externalReferences"]
    assert [(file["bom-ref"], file["name"], file["hashes"]) for file in base["components"]] == [
        (f"file:base-model/{name}", name, [{"alg": "SHA-256", "content": digest}])
        for name, digest in sorted(HUB_FILES_SHA256.items())]
    assert properties(base, "ftpipe:observed:commit") == [HUB_COMMIT]
    assert properties(base, "ftpipe:retrieval:from") == ["downloaded"]
    assert not [prop for prop in base["properties"] if "files_sha256" in prop["name"]]   # the files say it once


def test_a_gguf_base_models_check_against_llama_cpp_is_a_property(report):
    from tests.release_fixtures import GGUF_CHECK

    report["base_model"]["gguf_check"] = GGUF_CHECK
    sbom = build_sbom(report)
    validate_sbom(sbom)
    base = by_ref(sbom)["model:base"]
    assert properties(base, "ftpipe:gguf_check:mean_kl_nats") == ["0.00465"]
    assert properties(base, "ftpipe:gguf_check:top1_agreement") == ["0.9167"]
    assert "purl" not in base and base["version"] == report["base_model"]["revision"]


# --- the evaluate and audit gates, and canaries -------------------------------------------------------------

@pytest.fixture
def gated(report):
    from tests.release_fixtures import with_gates_and_audit

    return with_gates_and_audit(report)


def test_the_gates_verdicts_and_the_canaries_are_properties_of_the_model(gated):
    sbom = build_sbom(gated)
    validate_sbom(sbom)
    merged = sbom["metadata"]["component"]
    assert properties(merged, "ftpipe:evaluate:gate:passed") == ["true"]
    assert properties(merged, "ftpipe:evaluate:gate:checks") == ["2"]
    assert properties(merged, "ftpipe:evaluate:gate:missed") == []
    assert properties(merged, "ftpipe:audit:gate:passed") == ["true"]
    assert properties(merged, "ftpipe:audit:canaries_used") == ["true"]
    assert properties(merged, "ftpipe:audit:canaries:count") == ["2"]
    assert properties(merged, "ftpipe:audit:canaries:repeats") == ["1", "8"]
    assert properties(merged, "ftpipe:audit:pii_leaks") == ["0"]
    metrics = {(metric["type"], metric["slice"]): metric["value"]
               for metric in merged["modelCard"]["quantitativeAnalysis"]["performanceMetrics"]}
    assert metrics[("ROUGE-L", "test split, data source forum_answers (1 examples), fine-tuned model")] == "0.3"
    assert metrics[("chrF", "test split (73 examples), fine-tuned model")] == "0.37"
    assert metrics[("loss", "general text (Python 3.12 documentation, tutorial prose, PSF-2.0), fine-tuned model")] \
        == "3.02"
    assert metrics[("extraction gap (verbatim-prefix share, train - test)",
                    "training vs test prompts of data source forum_answers, greedy, fine-tuned model")] == "0.13"
    assert metrics[("canary exposure (bits)", "canary-2, planted 8 times, ranked among 1000 candidates")] == "6.6"


def test_a_missed_gate_is_named_and_no_canaries_say_so(gated):
    from tests.release_fixtures import CANARY_SECRET

    gated["evaluation"]["gate"]["passed"] = False
    gated["evaluation"]["gate"]["checks"][0].update(value=0.01, passed=False)
    gated["audit"]["canaries"] = None
    sbom = build_sbom(gated)
    validate_sbom(sbom)
    merged = sbom["metadata"]["component"]
    assert properties(merged, "ftpipe:evaluate:gate:passed") == ["false"]
    assert properties(merged, "ftpipe:evaluate:gate:missed") == [
        "evaluate.gate.min_gain: rougeL gain of tuned over base = 0.01 (min 0.05)"]
    assert properties(merged, "ftpipe:audit:canaries_used") == ["false"]
    assert properties(merged, "ftpipe:audit:canaries:count") == []
    assert CANARY_SECRET not in json.dumps(sbom)


def test_a_report_from_before_the_gates_has_no_gate_properties(report):
    merged = build_sbom(report)["metadata"]["component"]
    assert not [prop for prop in merged["properties"] if prop["name"].startswith(("ftpipe:evaluate:", "ftpipe:audit:"))]
