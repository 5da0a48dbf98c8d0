"""ftpipe.compliance.licenses: the concluded license of a fine-tuned model, and the license gate. Pure and fast."""
from __future__ import annotations

import json

import pytest

from ftpipe.compliance.licenses import (
    EXPECTED_FORM,
    LicenseDeclaration,
    LicenseError,
    LicenseGateError,
    LicensePolicy,
    ReviewedLicenseProperties,
    conclude_licenses,
    enforce_license_gate,
    resolve_license_id,
    reviewed_license_properties,
)
from ftpipe.core.errors import PipelineError
from ftpipe.core.params import ReviewedLicense

BASE = LicenseDeclaration("HuggingFaceTB/SmolLM2-135M-Instruct", "Apache-2.0")
APACHE_NOTICE = ("keep the copyright, patent and attribution notices and the license text; pass on the source's "
                 "NOTICE file if it has one (section 4)")
CC_BY_NC_NOTICE = ("credit the creator, keep the copyright notice, link CC BY-NC 4.0 and say that the material was "
                   "changed (section 3(a))")
NC_FIX = ("set intended_use to 'research' or 'internal' if the model will not be used commercially, or remove the "
          "data source")
UNKNOWN_FIX = ("have a reviewer read its text and declare it under compliance.reviewed_licenses in params.yaml (an "
               "id, LicenseRef-<name> if SPDX does not list it, also declared as the input's license; its properties, "
               "URL and reviewer), declare a license that ftpipe/compliance/license_table.py knows (or add a row for "
               "it there), remove the data source, or set unknown_blocks to false to only flag it")
HOW_TO_FIX = ("To fix: change intended_use, remove the source (or choose another base model), or change the license "
              "policy (allowed_licenses, denied_licenses, unknown_blocks).")


def policy(intended_use: str, *, allowed: list[str], denied: list[str], unknown_blocks: bool) -> LicensePolicy:
    return LicensePolicy(intended_use=intended_use, allowed_licenses=allowed, denied_licenses=denied,
                         unknown_blocks=unknown_blocks)


OPEN_COMMERCIAL = policy("commercial", allowed=[], denied=[], unknown_blocks=True)
OPEN_RESEARCH = policy("research", allowed=[], denied=[], unknown_blocks=True)


def conclude(sources: dict[str, str | None], license_policy: LicensePolicy, base: LicenseDeclaration = BASE,
             reviewed: tuple[ReviewedLicenseProperties, ...] = ()) -> dict:
    return conclude_licenses(base, [LicenseDeclaration(name, lic) for name, lic in sources.items()], license_policy,
                             reviewed)


def by_rule(conclusion: dict) -> list[tuple[str, str, str]]:
    return [(v["source"], v["license"], v["rule"]) for v in conclusion["violations"]]


# --- non-commercial ------------------------------------------------------------------------------------

def test_non_commercial_source_fails_commercial_use_with_a_message_naming_source_license_and_rule():
    conclusion = conclude({"tickets": "CC-BY-NC-4.0"}, OPEN_COMMERCIAL)
    assert conclusion["verdict"] == "fail"
    assert conclusion["violations"] == [{
        "source": "tickets", "role": "data source", "license": "CC-BY-NC-4.0", "rule": "non-commercial",
        "reason": "forbids commercial use, and intended_use is 'commercial'", "fix": NC_FIX}]
    with pytest.raises(LicenseGateError) as raised:
        enforce_license_gate(conclusion)
    assert str(raised.value) == (
        "license gate failed for intended_use 'commercial': 1 violation\n"
        "  - data source 'tickets': CC-BY-NC-4.0 [non-commercial] forbids commercial use, and intended_use is "
        f"'commercial'; fix: {NC_FIX}\n" + HOW_TO_FIX)
    assert raised.value.violations == conclusion["violations"]
    assert isinstance(raised.value, PipelineError)   # run_stage prints it without a traceback, exit 2


def test_non_commercial_source_passes_research_and_the_conclusion_says_non_commercial():
    conclusion = conclude({"tickets": "CC-BY-NC-4.0"}, OPEN_RESEARCH)
    enforce_license_gate(conclusion)   # passes: no exception
    assert conclusion == {
        "policy": {"intended_use": "research", "allowed_licenses": [], "denied_licenses": [], "unknown_blocks": True},
        "verdict": "pass",
        "concluded_license": "Apache-2.0 AND CC-BY-NC-4.0",
        "commercial_use": "not allowed",
        "commercial_use_allowed": False,
        "inputs": [
            {"role": "base model", "name": BASE.name, "declared": "Apache-2.0", "chosen": "Apache-2.0"},
            {"role": "data source", "name": "tickets", "declared": "CC-BY-NC-4.0", "chosen": "CC-BY-NC-4.0"}],
        "share_alike": [],
        "attribution": [
            {"source": BASE.name, "license": "Apache-2.0", "notice": APACHE_NOTICE},
            {"source": "tickets", "license": "CC-BY-NC-4.0", "notice": CC_BY_NC_NOTICE}],
        "non_commercial_sources": [{"source": "tickets", "license": "CC-BY-NC-4.0"}],
        "unknown_licenses": [],
        "reviewed_licenses": [],
        "notes": [],
        "violations": [],
    }
    assert json.loads(json.dumps(conclusion)) == conclusion   # feeds a JSON report as is


def test_internal_use_is_not_commercial_use():
    conclusion = conclude({"tickets": "CC-BY-NC-SA-4.0"}, policy("internal", allowed=[], denied=[],
                                                                 unknown_blocks=True))
    assert (conclusion["verdict"], conclusion["commercial_use_allowed"]) == ("pass", False)


# --- share-alike, attribution, base model terms --------------------------------------------------------

def test_share_alike_source_propagates():
    conclusion = conclude({"wiki": "CC-BY-SA-4.0", "code": "GPL-3.0-or-later"}, OPEN_COMMERCIAL)
    assert conclusion["verdict"] == "pass"
    assert conclusion["commercial_use_allowed"] is True
    assert conclusion["share_alike"] == [{"source": "wiki", "license": "CC-BY-SA-4.0", "copyleft": "share-alike"},
                                         {"source": "code", "license": "GPL-3.0-or-later", "copyleft": "copyleft"}]
    assert conclusion["concluded_license"] == "Apache-2.0 AND CC-BY-SA-4.0 AND GPL-3.0-or-later"


def test_base_model_terms_are_carried_through():
    llama = LicenseDeclaration("meta-llama/Llama-3.1-8B-Instruct", "llama3.1")
    conclusion = conclude({"docs": "PSF-2.0"}, OPEN_COMMERCIAL, base=llama)
    assert conclusion["verdict"] == "pass"
    assert conclusion["concluded_license"] == "LicenseRef-Llama3.1-Community AND PSF-2.0"
    assert conclusion["attribution"] == [
        {"source": llama.name, "license": "LicenseRef-Llama3.1-Community",
         "notice": 'display "Built with Llama"; begin the model\'s name with "Llama"; ship a copy of the Llama 3.1 '
                   'Community License and its Notice file'},
        {"source": "docs", "license": "PSF-2.0",
         "notice": "keep the PSF copyright notice and license agreement, and summarize the changes made "
                   "(sections 2 and 3)"}]
    assert conclusion["share_alike"] == [{"source": llama.name, "license": "LicenseRef-Llama3.1-Community",
                                          "copyleft": "pass-through-terms"}]
    assert conclusion["notes"] == [
        f"base model {llama.name!r}: LicenseRef-Llama3.1-Community: commercial use needs a separate license from "
        "Meta if the licensee's products had more than 700 million monthly active users; Meta's Acceptable Use "
        "Policy binds every user of the model"]


def test_with_exception_keeps_the_base_license_properties_and_records_the_exception():
    conclusion = conclude({"gcc": "GPL-3.0-only WITH GCC-exception-3.1"}, OPEN_RESEARCH)
    assert conclusion["concluded_license"] == "Apache-2.0 AND GPL-3.0-only WITH GCC-exception-3.1"
    assert conclusion["share_alike"] == [{"source": "gcc", "license": "GPL-3.0-only WITH GCC-exception-3.1",
                                          "copyleft": "copyleft"}]
    assert conclusion["notes"][0] == ("data source 'gcc': GPL-3.0-only WITH GCC-exception-3.1: the obligations are "
                                      "those of GPL-3.0-only; the exception GCC-exception-3.1 is recorded, not "
                                      "evaluated")


# --- unknown licenses ----------------------------------------------------------------------------------

UNKNOWNS = [  # declared, as messages name it, in the concluded expression, reason
    ("other", "other", "LicenseRef-Unknown",
     "on Hugging Face 'other' means the license is described in the card's text"),
    ("LicenseRef-Foo", "LicenseRef-Foo", "LicenseRef-Foo",
     "'LicenseRef-Foo' is not an SPDX id, a LicenseRef- id of ftpipe/compliance/license_table.py or a known Hugging "
     "Face id"),
    ("xyzzy-licence", "xyzzy-licence", "LicenseRef-Unknown",
     "'xyzzy-licence' is not an SPDX id, a LicenseRef- id of ftpipe/compliance/license_table.py or a known Hugging "
     "Face id"),
    ("EPL-2.0", "EPL-2.0", "EPL-2.0", "EPL-2.0 has no properties row in ftpipe/compliance/license_table.py"),
]


@pytest.mark.parametrize("declared, named, in_expression, reason", UNKNOWNS)
def test_unknown_license_blocks_when_the_policy_says_so(declared, named, in_expression, reason):
    conclusion = conclude({"scraped": declared}, OPEN_RESEARCH)
    assert conclusion["verdict"] == "fail"
    assert conclusion["violations"] == [{
        "source": "scraped", "role": "data source", "license": named, "rule": "unknown-license",
        "reason": f"is unknown ({reason}), and unknown_blocks is true", "fix": UNKNOWN_FIX}]


@pytest.mark.parametrize("declared, named, in_expression, reason", UNKNOWNS)
def test_unknown_license_passes_with_a_flag_when_the_policy_does_not_block(declared, named, in_expression, reason):
    conclusion = conclude({"scraped": declared}, policy("commercial", allowed=[], denied=[], unknown_blocks=False))
    assert conclusion["verdict"] == "pass"
    assert conclusion["unknown_licenses"] == [{"source": "scraped", "license": declared, "reason": reason}]
    assert conclusion["commercial_use_allowed"] is False   # never guessed
    assert conclusion["commercial_use"] == "unknown"       # nor denied: nothing known forbids it
    assert conclusion["concluded_license"] == f"Apache-2.0 AND {in_expression}"
    assert conclusion["notes"] == [f"data source 'scraped': {declared} is unknown ({reason}): its obligations were "
                                   "not checked and commercial use cannot be confirmed"]


# --- declarations that are missing or do not parse -----------------------------------------------------

@pytest.mark.parametrize("declared, problem", [
    ("MIT AND", "license 'MIT AND' is not a valid license expression (AND requires two or more licenses as in: "
                "MIT AND BSD)"),
    ("MIT/Apache-2.0", "license 'MIT/Apache-2.0' is not a valid license expression (Invalid license key: the valid "
                       "characters are: letters and numbers, underscore, dot, colon or hyphen signs and spaces: "
                       "'MIT/Apache-2.0')"),
    ("(MIT", "license '(MIT' is not a valid license expression (Invalid expression)"),
    ("Classpath-exception-2.0", "license 'Classpath-exception-2.0' is not a valid license expression (A license "
                                "exception symbol can only be used as an exception in a \"WITH exception\" "
                                "statement. for token: \"Classpath-exception-2.0\")"),
    (None, "no license declared"),
    ("  ", "no license declared"),
    (2.0, "license must be text, got 2.0"),
])
def test_missing_or_unparseable_license_names_the_source_and_shows_the_expected_form(declared, problem):
    with pytest.raises(LicenseError) as raised:
        conclude({"tickets": declared}, OPEN_RESEARCH)
    assert str(raised.value) == f"data source 'tickets': {problem}; expected {EXPECTED_FORM}"


def test_every_bad_declaration_is_reported_at_once():
    base = LicenseDeclaration("my-model", None)
    with pytest.raises(LicenseError) as raised:
        conclude({"a": "MIT", "b": "(MIT"}, OPEN_RESEARCH, base=base)
    assert str(raised.value) == (f"base model 'my-model': no license declared; expected {EXPECTED_FORM}\n"
                                 "data source 'b': license '(MIT' is not a valid license expression (Invalid "
                                 f"expression); expected {EXPECTED_FORM}")


# --- ids -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("declared, canonical", [
    ("apache-2.0", "Apache-2.0"), ("APACHE-2.0", "Apache-2.0"), ("mit", "MIT"), ("cc-by-nc-4.0", "CC-BY-NC-4.0"),
    ("odbl", "ODbL-1.0"), ("odc-by-1.0", "ODC-By-1.0"), ("gpl-3.0", "GPL-3.0-only"),
    ("llama3", "LicenseRef-Llama3-Community"), ("llama3.1", "LicenseRef-Llama3.1-Community"),
    ("licenseref-llama3-community", "LicenseRef-Llama3-Community"), ("gemma", "LicenseRef-Gemma"),
    ("openrail", "LicenseRef-OpenRAIL"), ("EPL-2.0", "EPL-2.0"),
    ("other", None), ("unknown", None), ("bsd", None), ("LicenseRef-Foo", None), ("xyzzy", None),
])
def test_hugging_face_and_spdx_ids_resolve_to_canonical_ids(declared, canonical):
    assert resolve_license_id(declared) == canonical


def test_expressions_are_normalized_to_spdx_case():
    conclusion = conclude({"a": "apache-2.0 and cc-by-4.0", "b": "llama3"}, OPEN_RESEARCH)
    assert conclusion["concluded_license"] == "Apache-2.0 AND CC-BY-4.0 AND LicenseRef-Llama3-Community"


# --- OR and AND ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("declared, chosen", [
    ("GPL-3.0-only OR MIT", "MIT"),                   # copyleft vs none
    ("CC-BY-SA-4.0 OR CC-BY-4.0", "CC-BY-4.0"),       # share-alike vs none
    ("CC-BY-NC-4.0 OR CC-BY-SA-4.0", "CC-BY-SA-4.0"), # non-commercial weighs more than share-alike
    ("CC0-1.0 OR MIT", "CC0-1.0"),                    # no attribution duty
    ("MIT OR Apache-2.0", "Apache-2.0"),              # a tie: the first in sorted order, for a stable result
    ("(MIT AND CC-BY-NC-4.0) OR BSD-3-Clause", "BSD-3-Clause"),
])
def test_or_picks_the_least_restrictive_option_and_says_which(declared, chosen):
    conclusion = conclude({"mixed": declared}, OPEN_RESEARCH)
    assert conclusion["inputs"][1]["chosen"] == chosen
    assert conclusion["notes"][0] == (f"data source 'mixed': {declared!r} offers a choice; chose {chosen!r}, the "
                                      "least restrictive option for intended_use 'research'")


def test_or_avoids_an_option_the_policy_forbids():
    no_apache = policy("research", allowed=[], denied=["Apache-2.0"], unknown_blocks=True)
    base = LicenseDeclaration("base", "MIT")
    conclusion = conclude({"mixed": "MIT OR Apache-2.0"}, no_apache, base=base)
    assert (conclusion["verdict"], conclusion["inputs"][1]["chosen"]) == ("pass", "MIT")


def test_and_combines_all_obligations():
    conclusion = conclude({"mixed": "CC-BY-SA-4.0 AND cc-by-nc-4.0"}, OPEN_COMMERCIAL)
    assert conclusion["inputs"][1]["chosen"] == "CC-BY-NC-4.0 AND CC-BY-SA-4.0"
    assert conclusion["share_alike"] == [{"source": "mixed", "license": "CC-BY-SA-4.0", "copyleft": "share-alike"}]
    assert conclusion["non_commercial_sources"] == [{"source": "mixed", "license": "CC-BY-NC-4.0"}]
    assert [(a["source"], a["license"]) for a in conclusion["attribution"]] == [
        (BASE.name, "Apache-2.0"), ("mixed", "CC-BY-SA-4.0"), ("mixed", "CC-BY-NC-4.0")]
    assert by_rule(conclusion) == [("mixed", "CC-BY-NC-4.0", "non-commercial")]
    assert conclusion["concluded_license"] == "Apache-2.0 AND CC-BY-NC-4.0 AND CC-BY-SA-4.0"


# --- allowed and denied lists --------------------------------------------------------------------------

def test_denied_license_fails():
    no_gpl = policy("research", allowed=[], denied=["GPL-3.0-only", "AGPL-3.0-only"], unknown_blocks=True)
    conclusion = conclude({"code": "gpl-3.0-only", "docs": "MIT"}, no_gpl)
    assert conclusion["violations"] == [{
        "source": "code", "role": "data source", "license": "GPL-3.0-only", "rule": "denied",
        "reason": "is in denied_licenses", "fix": "remove the data source, or take GPL-3.0-only off denied_licenses"}]


def test_license_outside_a_non_empty_allow_list_fails_and_allow_list_ids_are_normalized():
    permissive = policy("commercial", allowed=["apache-2.0", "MIT"], denied=[], unknown_blocks=True)
    assert permissive.allowed_licenses == ("Apache-2.0", "MIT")
    conclusion = conclude({"docs": "PSF-2.0", "code": "mit"}, permissive,
                          base=LicenseDeclaration("meta-llama/Meta-Llama-3-8B", "llama3"))
    assert by_rule(conclusion) == [("meta-llama/Meta-Llama-3-8B", "LicenseRef-Llama3-Community", "not-allowed"),
                                   ("docs", "PSF-2.0", "not-allowed")]
    assert conclusion["violations"][0]["fix"] == ("choose another base model, or add LicenseRef-Llama3-Community to "
                                                  "allowed_licenses")


@pytest.mark.parametrize("fields, message", [
    ({"intended_use": "personal"}, "license policy: intended_use 'personal' is not one of commercial, research, "
                                   "internal"),
    ({"unknown_blocks": "yes"}, "license policy: unknown_blocks must be true or false, got 'yes'"),
    ({"denied_licenses": ["other"]}, "license policy: denied_licenses: 'other' is not an SPDX id, a LicenseRef- id "
                                     "or a known Hugging Face id; list single ids such as 'CC-BY-NC-4.0'"),
    ({"allowed_licenses": "MIT"}, "license policy: allowed_licenses must be a list of license ids, got the string "
                                  "'MIT'"),
    ({"allowed_licenses": ["MIT"], "denied_licenses": ["mit"]}, "license policy: ['MIT'] are both allowed and "
                                                                "denied"),
])
def test_invalid_policy_is_an_error(fields, message):
    valid = {"intended_use": "research", "allowed_licenses": [], "denied_licenses": [], "unknown_blocks": True}
    with pytest.raises(LicenseError) as raised:
        LicensePolicy(**(valid | fields))
    assert str(raised.value) == message


def test_policy_fields_are_required():
    with pytest.raises(TypeError):
        LicensePolicy(intended_use="research")   # type: ignore[call-arg]


# --- no-derivatives ------------------------------------------------------------------------------------

@pytest.mark.parametrize("intended_use", ["commercial", "research", "internal"])
def test_no_derivatives_always_fails(intended_use):
    lenient = policy(intended_use, allowed=[], denied=[], unknown_blocks=False)
    conclusion = conclude({"essays": "CC-BY-ND-4.0"}, lenient)
    assert conclusion["violations"] == [{
        "source": "essays", "role": "data source", "license": "CC-BY-ND-4.0", "rule": "no-derivatives",
        "reason": "forbids derivatives, and a fine-tuned model is a derivative",
        "fix": "remove the data source (no policy can allow a no-derivatives license)"}]


def test_non_commercial_no_derivatives_reports_both_rules_for_commercial_use():
    conclusion = conclude({"essays": "CC-BY-NC-ND-3.0"}, OPEN_COMMERCIAL)
    assert by_rule(conclusion) == [("essays", "CC-BY-NC-ND-3.0", "no-derivatives"),
                                   ("essays", "CC-BY-NC-ND-3.0", "non-commercial")]
    with pytest.raises(LicenseGateError) as raised:
        enforce_license_gate(conclusion)
    assert str(raised.value).splitlines()[0] == "license gate failed for intended_use 'commercial': 2 violations"


# --- licenses a reviewer declared (params.yaml compliance.reviewed_licenses) ----------------------------

ACME_URL = "https://acme.example/data-license-1.0"
REVIEWER = "J. Doe, legal, 2026-11-30"


def reviewed_entry(license_id: str = "LicenseRef-Acme-Data-1.0", **fields) -> ReviewedLicense:
    """A compliance.reviewed_licenses entry as ftpipe.core.params builds it: commercial, share-alike, with credit."""
    return ReviewedLicense(**{"id": license_id, "name": "Acme Data License 1.0", "url": ACME_URL,
                              "commercial_use": True, "copyleft": "share-alike", "no_derivatives": False,
                              "attribution": "credit Acme Corp. and link the license",
                              "notes": "the data's provenance file must ship with the model",
                              "reviewed_by": REVIEWER, **fields})


def acme(**fields) -> tuple[ReviewedLicenseProperties, ...]:
    return reviewed_license_properties([reviewed_entry(**fields)])


def test_reviewed_license_rows_are_built_from_params_entries():
    (row,) = acme()
    assert row == ReviewedLicenseProperties(
        license_id="LicenseRef-Acme-Data-1.0", commercial_use=True, copyleft="share-alike", no_derivatives=False,
        attribution="credit Acme Corp. and link the license",
        notes="the data's provenance file must ship with the model",
        name="Acme Data License 1.0", url=ACME_URL, reviewed_by=REVIEWER)
    assert row.share_alike
    assert reviewed_license_properties([]) == ()


def test_without_a_review_the_same_license_ref_is_unknown_and_blocks():
    conclusion = conclude({"acme_docs": "LicenseRef-Acme-Data-1.0"}, OPEN_COMMERCIAL)
    assert by_rule(conclusion) == [("acme_docs", "LicenseRef-Acme-Data-1.0", "unknown-license")]
    assert conclusion["violations"][0]["fix"].startswith("have a reviewer read its text and declare it under "
                                                         "compliance.reviewed_licenses in params.yaml")


def test_a_reviewed_license_ref_is_judged_by_its_declared_properties_and_recorded_with_its_reviewer():
    conclusion = conclude({"acme_docs": "licenseref-acme-data-1.0", "mixed": "LicenseRef-Acme-Data-1.0 AND MIT"},
                          OPEN_COMMERCIAL, reviewed=acme())
    enforce_license_gate(conclusion)   # passes: the reviewed license is known, and allows commercial use
    assert conclusion["verdict"] == "pass" and conclusion["violations"] == []
    assert (conclusion["commercial_use"], conclusion["commercial_use_allowed"]) == ("allowed", True)
    assert conclusion["unknown_licenses"] == []
    # resolved case-insensitively, written as the reviewer declared it
    assert conclusion["concluded_license"] == "Apache-2.0 AND LicenseRef-Acme-Data-1.0 AND MIT"
    assert conclusion["inputs"][1]["chosen"] == "LicenseRef-Acme-Data-1.0"
    assert conclusion["share_alike"] == [
        {"source": "acme_docs", "license": "LicenseRef-Acme-Data-1.0", "copyleft": "share-alike"},
        {"source": "mixed", "license": "LicenseRef-Acme-Data-1.0", "copyleft": "share-alike"}]
    assert {"source": "acme_docs", "license": "LicenseRef-Acme-Data-1.0",
            "notice": "credit Acme Corp. and link the license"} in conclusion["attribution"]
    assert conclusion["reviewed_licenses"] == [{
        "id": "LicenseRef-Acme-Data-1.0", "name": "Acme Data License 1.0", "url": ACME_URL,
        "properties": {"commercial_use": True, "copyleft": "share-alike", "no_derivatives": False,
                       "attribution": "credit Acme Corp. and link the license",
                       "notes": "the data's provenance file must ship with the model"},
        "reviewed_by": REVIEWER, "used_by": ["acme_docs", "mixed"]}]
    reviewed_note = ("LicenseRef-Acme-Data-1.0 was reviewed by J. Doe, legal, 2026-11-30; its properties come from "
                     "params.yaml compliance.reviewed_licenses")
    assert conclusion["notes"] == [
        f"data source 'acme_docs': {reviewed_note}",
        "data source 'acme_docs': LicenseRef-Acme-Data-1.0: the data's provenance file must ship with the model",
        f"data source 'mixed': {reviewed_note}",
        "data source 'mixed': LicenseRef-Acme-Data-1.0: the data's provenance file must ship with the model"]
    assert json.loads(json.dumps(conclusion)) == conclusion


def test_a_reviewed_license_is_recorded_only_where_it_is_used():
    conclusion = conclude({"docs": "MIT", "choice": "LicenseRef-Acme-Data-1.0 OR CC0-1.0"}, OPEN_COMMERCIAL,
                          reviewed=acme())
    assert conclusion["inputs"][2]["chosen"] == "CC0-1.0"   # no share-alike beats share-alike
    assert conclusion["reviewed_licenses"] == [] and conclusion["commercial_use"] == "allowed"


def test_a_reviewed_non_commercial_license_fails_commercial_use_like_a_table_row():
    reviewed = acme(commercial_use=False, copyleft="none")
    conclusion = conclude({"acme_docs": "LicenseRef-Acme-Data-1.0"}, OPEN_COMMERCIAL, reviewed=reviewed)
    assert by_rule(conclusion) == [("acme_docs", "LicenseRef-Acme-Data-1.0", "non-commercial")]
    research = conclude({"acme_docs": "LicenseRef-Acme-Data-1.0"}, OPEN_RESEARCH, reviewed=reviewed)
    assert (research["verdict"], research["commercial_use"], research["commercial_use_allowed"]) == (
        "pass", "not allowed", False)
    assert research["non_commercial_sources"] == [{"source": "acme_docs", "license": "LicenseRef-Acme-Data-1.0"}]


def test_a_reviewed_no_derivatives_license_always_fails():
    conclusion = conclude({"acme_docs": "LicenseRef-Acme-Data-1.0"}, OPEN_RESEARCH, reviewed=acme(no_derivatives=True))
    assert by_rule(conclusion) == [("acme_docs", "LicenseRef-Acme-Data-1.0", "no-derivatives")]


def test_a_reviewed_spdx_id_without_a_table_row_gets_its_properties():
    reviewed = acme(license_id="EPL-2.0", name="Eclipse Public License 2.0", copyleft="weak-copyleft")
    assert resolve_license_id("epl-2.0", reviewed) == "EPL-2.0"
    conclusion = conclude({"code": "epl-2.0"}, OPEN_COMMERCIAL, reviewed=reviewed)
    assert conclusion["verdict"] == "pass" and conclusion["commercial_use"] == "allowed"
    assert conclusion["share_alike"] == [{"source": "code", "license": "EPL-2.0", "copyleft": "weak-copyleft"}]
    assert [entry["id"] for entry in conclusion["reviewed_licenses"]] == ["EPL-2.0"]


def test_reviewed_ids_resolve_only_when_given():
    assert resolve_license_id("LICENSEREF-ACME-DATA-1.0", acme()) == "LicenseRef-Acme-Data-1.0"
    assert resolve_license_id("LicenseRef-Acme-Data-1.0") is None
    assert resolve_license_id("other", acme()) is None


@pytest.mark.parametrize("license_id, problem", [
    ("MIT", "ftpipe/compliance/license_table.py already has a row for MIT, and that row applies; remove this entry "
            "(or, if the row is wrong, correct it there)"),
    ("odbl", "ftpipe/compliance/license_table.py already has a row for ODbL-1.0"),          # a Hugging Face id of a row
    ("LicenseRef-gemma", "ftpipe/compliance/license_table.py already has a row for LicenseRef-Gemma"),
    ("LicenseRef-Unknown", "LicenseRef-Unknown is reserved (it stands for ids that are not SPDX)"),
    ("Acme-Data", "not an SPDX license id; for a license SPDX does not list, write LicenseRef-<name>"),
    ("epl-2.0", "write the SPDX id in SPDX's case: 'EPL-2.0'"),
])
def test_a_reviewed_id_the_table_knows_or_that_is_not_spdx_is_an_error_naming_the_key(license_id, problem):
    with pytest.raises(LicenseError) as raised:
        acme(license_id=license_id)
    assert str(raised.value).startswith(f"params.yaml compliance.reviewed_licenses: id {license_id!r}: {problem}")
    with pytest.raises(LicenseError, match="already has a row|reserved|not an SPDX|SPDX's case"):
        conclude({"docs": "MIT"}, OPEN_RESEARCH, reviewed=(ReviewedLicenseProperties(
            license_id, True, "none", False, None, "", "a name", ACME_URL, REVIEWER),))   # checked here too


def test_every_bad_reviewed_id_is_reported_at_once():
    with pytest.raises(LicenseError) as raised:
        reviewed_license_properties([reviewed_entry("MIT"), reviewed_entry("LicenseRef-A"),
                                     reviewed_entry("LicenseRef-a")])
    assert str(raised.value).splitlines() == [
        "params.yaml compliance.reviewed_licenses: id 'MIT': ftpipe/compliance/license_table.py already has a row for "
        "MIT, and that row applies; remove this entry (or, if the row is wrong, correct it there)",
        "params.yaml compliance.reviewed_licenses: id 'LicenseRef-a': declared more than once; keep one entry"]


# --- commercial use: allowed, not allowed, unknown -------------------------------------------------------

LENIENT_COMMERCIAL = policy("commercial", allowed=[], denied=[], unknown_blocks=False)


@pytest.mark.parametrize("sources, expected", [
    ({"docs": "MIT"}, "allowed"),
    ({"docs": "MIT", "scraped": "other"}, "unknown"),                 # nothing forbids it, nothing establishes it
    ({"notes": "CC-BY-NC-4.0", "scraped": "other"}, "not allowed"),  # a known license forbids it
])
def test_commercial_use_is_unknown_only_when_no_known_license_forbids_it(sources, expected):
    conclusion = conclude(sources, policy("research", allowed=[], denied=[], unknown_blocks=False))
    assert conclusion["verdict"] == "pass"
    assert conclusion["commercial_use"] == expected
    assert conclusion["commercial_use_allowed"] is (expected == "allowed")


def test_an_unknown_license_that_passes_a_commercial_gate_leaves_commercial_use_unknown():
    conclusion = conclude({"scraped": "LicenseRef-House"}, LENIENT_COMMERCIAL)
    assert (conclusion["verdict"], conclusion["commercial_use"]) == ("pass", "unknown")
    assert conclusion["commercial_use_allowed"] is False and conclusion["violations"] == []
    reviewed = reviewed_license_properties([reviewed_entry("LicenseRef-House", name="House License")])
    reviewed_conclusion = conclude({"scraped": "LicenseRef-House"}, LENIENT_COMMERCIAL, reviewed=reviewed)
    assert reviewed_conclusion["commercial_use"] == "allowed" and reviewed_conclusion["unknown_licenses"] == []
