"""Stage `compliance`: the license gate, before any training.

    python -m stages.compliance

Reads what params.yaml declares (compliance.*: the intended use, the license policy, the licenses a reviewer
declared with their properties (reviewed_licenses), and the base model's and every data source's origin,
license, creators, personal data and intended-use notes), the data ingest
materialized (data/raw/provenance.json) and the base model's record (models/base/provenance.json). It
concludes the fine-tuned model's license obligations from its inputs (ftpipe/compliance/licenses.py) and fails, naming
every source, its license and the rule, when the intended use or the policy forbids the result. For the
embedded default base model it also checks the declared license against the package's own metadata; for a hub
model, that compliance.base_model.id and .revision are the repo and commit the base stage took.

Writes data/compliance/:
- conclusion.json: the conclusion (concluded license, obligations, verdict), the declarations and the
  hashes of the inputs they describe; the report stage and the model cards read it.
- gate.json: what train depends on: the verdict and the content hashes checked, and no license text, so
  that a declaration change that still passes reruns only this stage and the report, never training.
A failing gate publishes nothing (train cannot run) and logs its conclusion to MLflow.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.compliance.licenses import (
    LicenseDeclaration,
    LicenseError,
    LicensePolicy,
    conclude_licenses,
    enforce_license_gate,
    resolve_license_id,
    reviewed_license_properties,
)
from ftpipe.core.errors import run_stage
from ftpipe.core.io import CONTENT_FILE, read_json, write_json
from ftpipe.core.params import ComplianceParams, Params, flatten
from ftpipe.core.paths import BASE_DIR, COMPLIANCE_DIR, PERSONAL_DATA_FILE, PROVENANCE_FILE, RAW_DIR
from ftpipe.core.stage import Stage

CONCLUSION_FILE = "conclusion.json"
GATE_FILE = "gate.json"
COMMERCIAL_USE_SUMMARY = {"allowed": "commercial use allowed", "not allowed": "NOT for commercial use",
                          "unknown": "commercial use NOT established: a license is unknown"}


def check_embedded_base(params: ComplianceParams, base_record: dict[str, Any]) -> None:
    """The embedded default's declared id and license must be what its package says (a typo here would put a
    wrong license on every card)."""
    source = base_record.get("source", {})
    if source.get("kind") != "pypi-package":
        return
    declared, packaged = params.base_model.license or "", source.get("declared_license") or ""
    where = f"package {source['package']} {source['version']}"
    if (resolve_license_id(declared) or declared) != (resolve_license_id(packaged) or packaged):
        raise LicenseError(f"params.yaml compliance.base_model.license is {declared!r}, but the {where} declares "
                           f"{packaged!r} in its metadata. Set compliance.base_model.license: {packaged}.")
    if params.base_model.id != source.get("model_id"):
        raise LicenseError(f"params.yaml compliance.base_model.id is {params.base_model.id!r}, but the {where} holds "
                           f"{source.get('model_id')!r}. Set compliance.base_model.id: {source.get('model_id')}.")


def check_hub_base(params: ComplianceParams, base_record: dict[str, Any]) -> None:
    """A hub base model's declared id and revision must be the repo and commit the base stage took (base.model,
    base.revision, recorded in models/base/content.json): the license and origin declared would otherwise be
    another model's."""
    source = base_record.get("source", {})
    if source.get("kind") != "hub":
        return
    for key, declared, taken, base_key in (("id", params.base_model.id, source["repo_id"], "base.model"),
                                           ("revision", params.base_model.revision, source["commit"], "base.revision")):
        if declared != taken:
            raise LicenseError(f"params.yaml compliance.base_model.{key} is {declared!r}, but {base_key} is {taken!r} "
                               f"(the hub model the base stage took): the declaration describes another model. Set "
                               f"compliance.base_model.{key}: {taken} (and check its license and origin).")


def conclude(params: ComplianceParams, raw_record: dict[str, Any], base_record: dict[str, Any]) -> dict[str, Any]:
    """The conclusion.json content: verdict and obligations, declarations, and the inputs' hashes. Raises
    LicenseError for a missing or unparseable license, a mismatch with the embedded model's package, or a hub
    model declared under another id or revision than the one taken."""
    check_embedded_base(params, base_record)
    check_hub_base(params, base_record)
    policy = LicensePolicy(params.intended_use, params.allowed_licenses, params.denied_licenses,
                           params.unknown_blocks)
    conclusion = conclude_licenses(LicenseDeclaration(params.base_model.id, params.base_model.license),
                                   [LicenseDeclaration(s.name, s.license) for s in params.sources], policy,
                                   reviewed_license_properties(params.reviewed_licenses))
    ingested = {source["name"]: source for source in raw_record["sources"]}
    return {
        "conclusion": conclusion,
        "declarations": {"base_model": dataclasses.asdict(params.base_model),
                         "sources": [dataclasses.asdict(source) for source in params.sources],
                         "reviewed_licenses": [dataclasses.asdict(entry) for entry in params.reviewed_licenses]},
        "inputs": {"base_model": {"digest": base_record["digest"], "source": base_record.get("source", {})},
                   "sources": {name: {"sha256": ingested[name]["sha256"], "rows": ingested[name]["rows"]}
                               for name in (s.name for s in params.sources) if name in ingested}},
    }


def gate_record(result: dict[str, Any]) -> dict[str, Any]:
    """What train depends on: the verdict alone. Train reads its data and base through their own deps, so
    the hashes checked here (in conclusion.json) would only rerun it for what cannot change its numbers: a
    license change that still passes, or a new source whose rows are all empty or rejected. A failed gate
    writes no gate.json, and DVC runs no train without it."""
    return {"verdict": result["conclusion"]["verdict"]}


def personal_data_record(params: ComplianceParams) -> dict[str, Any]:
    """What the audit depends on (its personal-data gate): the sources declared personal data, and nothing
    of the licenses, so a license change reruns no audit."""
    return {"sources": sorted(source.name for source in params.sources if source.personal_data)}


def summary_metrics(conclusion: dict[str, Any]) -> dict[str, Any]:
    return {"passed": conclusion["verdict"] == "pass", "commercial_use_allowed": conclusion["commercial_use_allowed"],
            "commercial_use": conclusion["commercial_use"],
            "concluded_license": conclusion["concluded_license"], "violations": len(conclusion["violations"]),
            "unknown_licenses": len(conclusion["unknown_licenses"]),
            "reviewed_licenses": len(conclusion["reviewed_licenses"]),
            "non_commercial_sources": len(conclusion["non_commercial_sources"]),
            "share_alike_sources": len(conclusion["share_alike"])}


def tracked_params(params: Params) -> dict:
    """The params.yaml keys this stage reads: dvc.yaml lists the same (tests/test_dvc_yaml.py)."""
    return flatten(params.compliance, "compliance")


def main() -> None:
    raw_record, base_record = read_json(RAW_DIR / PROVENANCE_FILE), read_json(BASE_DIR / CONTENT_FILE)
    with Stage("compliance", tracked_params) as stage:
        params = stage.params
        result = conclude(params.compliance, raw_record, base_record)
        conclusion = result["conclusion"]
        stage.tracker.log_dict(result, f"compliance/{CONCLUSION_FILE}")   # kept for a failed gate too
        stage.tracker.set_tags({"license.concluded": conclusion["concluded_license"],
                                "license.verdict": conclusion["verdict"],
                                "license.intended_use": params.compliance.intended_use})
        enforce_license_gate(conclusion)
        with stage.output() as out_dir:
            write_json(out_dir / CONCLUSION_FILE, result)
            write_json(out_dir / GATE_FILE, gate_record(result))
            write_json(out_dir / PERSONAL_DATA_FILE.name, personal_data_record(params.compliance))
        stage.finish(summary_metrics(conclusion))
    unknown = len(conclusion["unknown_licenses"])
    print(f"compliance: {conclusion['concluded_license']} for intended use {params.compliance.intended_use!r}: "
          f"pass ({COMMERCIAL_USE_SUMMARY[conclusion['commercial_use']]}"
          f"{f', {unknown} unknown license(s) flagged' if unknown else ''}) -> {Path(COMPLIANCE_DIR)}/")


if __name__ == "__main__":
    run_stage(main)
