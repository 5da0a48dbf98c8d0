"""The license gate: conclude a fine-tuned model's license from its inputs' licenses, and check a policy.

Every data source and the base model declare a license as an SPDX expression ("Apache-2.0",
"CC-BY-4.0 OR MIT", "GPL-2.0-or-later WITH Classpath-exception-2.0") or a Hugging Face id ("apache-2.0",
"llama3"). A missing or unparseable declaration is a LicenseError that names the input and shows the
expected form. Parsing and id validation are the `license-expression` package's; what a license asks of
a model trained on it is ours, in ftpipe/compliance/license_table.py, or a reviewer's, in params.yaml
compliance.reviewed_licenses (a license the table lacks, with its properties, URL and reviewer).

    reviewed = reviewed_license_properties(params.compliance.reviewed_licenses)   # checked against the table
    conclusion = conclude_licenses(base_model, data_sources, policy, reviewed)   # JSON-ready, pass or fail
    enforce_license_gate(conclusion)                                              # LicenseGateError if it failed

The model:
- Ids. Hugging Face ids go through an explicit table (llama3 -> LicenseRef-Llama3-Community); SPDX ids
  are matched case-insensitively and written in SPDX's case (apache-2.0 -> Apache-2.0). A license is
  unknown when it is not recognized (other, LicenseRef-Foo, xyzzy) or has no properties row: it is
  flagged, and its obligations are never guessed. In the concluded expression an id that is not valid
  SPDX (other) is written LicenseRef-Unknown; unknown LicenseRef- ids are kept as declared.
- Reviewed licenses. An entry of compliance.reviewed_licenses is a properties row like the table's: its id
  (a LicenseRef- id, or an SPDX id the table has no row for; one the table knows is an error) resolves
  case-insensitively and is written as the reviewer declared it. The conclusion records each one used
  (id, name, URL, properties, reviewer, the inputs under it) and notes, per input, whose review applies.
- Expressions. "A AND B": all of A's and B's obligations. "A OR B": the licensee chooses, so the gate
  takes the option with the fewest policy violations, then the least restrictive one (no no-derivatives,
  then known, then commercial use allowed, then the weakest copyleft, then the fewest attribution
  duties, then the fewest licenses), and records the choice in notes. "A WITH exception": A's properties;
  the exception is recorded, not evaluated.
- Conclusion. The model is a derivative of every input, so its license is the AND of every input's
  chosen licenses (deduplicated, sorted); share-alike and pass-through terms, attribution duties and
  notes are collected per input. Commercial use (commercial_use) is "not allowed" when a known license
  forbids it, else "unknown" when some license is unknown (nothing forbids it, but nothing establishes
  it: with unknown_blocks false the gate passes, and the report and cards say why and how to fix it),
  else "allowed"; commercial_use_allowed, for older readers, is true only for "allowed".
- Policy. intended_use is commercial, research or internal; only "commercial" conflicts with a
  non-commercial license. "internal" means internal non-commercial use (evaluation, research and
  development): a company using the model for its business is using it commercially in the sense of
  CC's NonCommercial and should declare "commercial".
- Violations (the gate fails on any): no-derivatives, always (a fine-tuned model is an adaptation; no
  policy can allow it); non-commercial, when intended_use is commercial; denied, a license in
  denied_licenses; not-allowed, a license outside a non-empty allowed_licenses; unknown-license, when
  unknown_blocks is true (otherwise unknown licenses are only flagged). Its first fix: a reviewer reads the
  license and declares it under compliance.reviewed_licenses.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from license_expression import ExpressionError, LicenseSymbol, LicenseWithExceptionSymbol, Licensing, get_spdx_licensing

from ftpipe.compliance.license_table import (
    COPYLEFT_RANK,
    HF_IDS_NAMING_NO_LICENSE,
    HF_LICENSE_IDS,
    LICENSE_PROPERTIES,
    LicenseProperties,
)
from ftpipe.core.errors import PipelineError

# Does the intended use count as commercial use? See the module docstring for "internal".
INTENDED_USES: dict[str, bool] = {"commercial": True, "research": False, "internal": False}
EXPECTED_FORM = ("an SPDX license expression such as 'Apache-2.0', 'CC-BY-4.0 OR MIT' or 'GPL-2.0-or-later "
                 "WITH Classpath-exception-2.0', or a Hugging Face id such as 'apache-2.0' or 'llama3'")
UNKNOWN_LICENSE_REF = "LicenseRef-Unknown"   # stands in the concluded expression for an id that is not SPDX
FIXES = {
    "no-derivatives": "{remove} (no policy can allow a no-derivatives license)",
    "non-commercial": "set intended_use to 'research' or 'internal' if the model will not be used "
                      "commercially, or {remove}",
    "denied": "{remove}, or take {license} off denied_licenses",
    "not-allowed": "{remove}, or add {license} to allowed_licenses",
    "unknown-license": "have a reviewer read its text and declare it under compliance.reviewed_licenses in "
                       "params.yaml (an id, LicenseRef-<name> if SPDX does not list it, also declared as the "
                       "input's license; its properties, URL and reviewer), declare a license that "
                       "ftpipe/compliance/license_table.py knows (or add a row for it there), {remove}, or set "
                       "unknown_blocks to false to only flag it",
}
Role = Literal["base model", "data source"]
REMOVE = {"data source": "remove the data source", "base model": "choose another base model"}
REVIEWED_IN = "params.yaml compliance.reviewed_licenses"


class LicenseError(PipelineError):
    """A license declaration or policy the user must fix."""


class LicenseGateError(LicenseError):
    """The inputs' licenses conflict with the policy; .violations holds the structured list."""

    def __init__(self, message: str, violations: list[dict[str, str]]):
        super().__init__(message)
        self.violations = violations


@dataclass(frozen=True)
class LicenseDeclaration:
    name: str             # the data source's name or the base model's id, as messages show it
    license: str | None   # as declared: an SPDX expression or a Hugging Face id; None if missing


@dataclass(frozen=True)
class LicensePolicy:
    intended_use: str                # one of INTENDED_USES
    allowed_licenses: Sequence[str]  # ids; empty: any license not denied
    denied_licenses: Sequence[str]   # ids
    unknown_blocks: bool             # does an unknown license fail the gate, or is it only flagged?

    def __post_init__(self) -> None:
        if self.intended_use not in INTENDED_USES:
            raise LicenseError(f"license policy: intended_use {self.intended_use!r} is not one of "
                               f"{', '.join(INTENDED_USES)}")
        if not isinstance(self.unknown_blocks, bool):
            raise LicenseError(f"license policy: unknown_blocks must be true or false, got {self.unknown_blocks!r}")
        # Stored canonical, so that matching a term is an exact comparison (frozen: set through object).
        allowed = _policy_ids("allowed_licenses", self.allowed_licenses)
        denied = _policy_ids("denied_licenses", self.denied_licenses)
        if set(allowed) & set(denied):
            raise LicenseError(f"license policy: {sorted(set(allowed) & set(denied))} are both allowed and denied")
        object.__setattr__(self, "allowed_licenses", allowed)
        object.__setattr__(self, "denied_licenses", denied)


@dataclass(frozen=True)
class LicenseTerm:
    """One license of an expression, resolved, and what is known of it."""
    declared: str                           # the id as the parser read it
    license_id: str | None                  # canonical id; None if not recognized (see _named_id)
    exception: str | None                   # the WITH exception, if any
    properties: LicenseProperties | None    # None: unknown
    unknown_reason: str | None

    def render(self) -> str:
        """As the concluded SPDX expression writes it."""
        return self._with_exception(self.license_id or UNKNOWN_LICENSE_REF)

    def display(self) -> str:
        """As messages name it: the declared id where it was not recognized."""
        return self._with_exception(self.license_id or self.declared)

    def _with_exception(self, license_id: str) -> str:
        return f"{license_id} WITH {self.exception}" if self.exception else license_id


Option = tuple[LicenseTerm, ...]   # licenses that apply together: one choice out of an expression's ORs


@dataclass(frozen=True)
class ReviewedLicenseProperties(LicenseProperties):
    """A row for a license ftpipe/compliance/license_table.py lacks, declared in params.yaml
    compliance.reviewed_licenses: the gate uses it as a row of the table; the conclusion also names the license, its
    text and its reviewer."""
    name: str
    url: str
    reviewed_by: str


def reviewed_license_properties(entries: Sequence[Any]) -> tuple[ReviewedLicenseProperties, ...]:
    """Rows from params.yaml compliance.reviewed_licenses entries (ftpipe.core.params.ReviewedLicense); LicenseError,
    naming the key and the id, for an id the table already knows or that is neither LicenseRef- nor SPDX."""
    rows = tuple(ReviewedLicenseProperties(
        license_id=entry.id, commercial_use=entry.commercial_use, copyleft=entry.copyleft,
        no_derivatives=entry.no_derivatives, attribution=entry.attribution, notes=entry.notes, name=entry.name,
        url=entry.url, reviewed_by=entry.reviewed_by) for entry in entries)
    _check_reviewed(rows)
    return rows


def _check_reviewed(rows: Sequence[ReviewedLicenseProperties]) -> None:
    errors, seen = [], set()
    for row in rows:
        license_id = row.license_id
        where = f"{REVIEWED_IN}: id {license_id!r}"
        known = resolve_license_id(license_id)
        if license_id.lower() in seen:
            errors.append(f"{where}: declared more than once; keep one entry")
        elif license_id.lower() == UNKNOWN_LICENSE_REF.lower():
            errors.append(f"{where}: {UNKNOWN_LICENSE_REF} is reserved (it stands for ids that are not SPDX); "
                          f"name the license: LicenseRef-<name>")
        elif known in LICENSE_PROPERTIES:
            errors.append(f"{where}: ftpipe/compliance/license_table.py already has a row for {known}, and that row "
                          f"applies; remove this entry (or, if the row is wrong, correct it there)")
        elif not license_id.startswith("LicenseRef-") and known is None:
            errors.append(f"{where}: not an SPDX license id; for a license SPDX does not list, write "
                          f"LicenseRef-<name>")
        elif not license_id.startswith("LicenseRef-") and known != license_id:
            errors.append(f"{where}: write the SPDX id in SPDX's case: {known!r}")
        seen.add(license_id.lower())
    if errors:
        raise LicenseError("\n".join(errors))


@functools.cache
def _spdx() -> Licensing:
    return get_spdx_licensing()


@functools.cache
def _known_ids_by_lowercase() -> dict[str, str]:
    """SPDX license ids (not exceptions) the parser knows, and ours, by lowercase id."""
    known = {key.lower(): key for key, symbol in _spdx().known_symbols.items() if not symbol.is_exception}
    return known | {license_id.lower(): license_id for license_id in LICENSE_PROPERTIES}


def resolve_license_id(declared: str, reviewed: Sequence[LicenseProperties] = ()) -> str | None:
    """The canonical SPDX or LicenseRef- id of one declared id (Hugging Face or SPDX, any case; or the id of a
    reviewed row, written as its reviewer declared it); None if not recognized. A recognized id can still lack
    a properties row (license_properties returns None)."""
    lowercase = declared.strip().lower()
    if lowercase in HF_LICENSE_IDS:
        return HF_LICENSE_IDS[lowercase]
    if lowercase in HF_IDS_NAMING_NO_LICENSE:
        return None
    return (_known_ids_by_lowercase().get(lowercase)
            or {row.license_id.lower(): row.license_id for row in reviewed}.get(lowercase))


def license_properties(license_id: str, reviewed: Sequence[LicenseProperties] = ()) -> LicenseProperties | None:
    return LICENSE_PROPERTIES.get(license_id) or next((row for row in reviewed if row.license_id == license_id), None)


def _named_id(declared: str, reviewed: Sequence[LicenseProperties] = ()) -> str | None:
    """resolve_license_id, or an unrecognized LicenseRef- id as written: it is valid SPDX, so it keeps its name
    (in the concluded expression, and for matching a policy's lists)."""
    return resolve_license_id(declared, reviewed) or (declared if declared.startswith("LicenseRef-") else None)


def _policy_ids(field: str, entries: Sequence[str]) -> tuple[str, ...]:
    if isinstance(entries, str):
        raise LicenseError(f"license policy: {field} must be a list of license ids, got the string {entries!r}")
    ids = []
    for entry in entries:
        license_id = _named_id(entry) if isinstance(entry, str) else None
        if license_id is None:
            raise LicenseError(f"license policy: {field}: {entry!r} is not an SPDX id, a LicenseRef- id or a "
                               f"known Hugging Face id; list single ids such as 'CC-BY-NC-4.0'")
        ids.append(license_id)
    return tuple(ids)


def _term(declared: str, exception: str | None, reviewed: Sequence[LicenseProperties]) -> LicenseTerm:
    recognized = resolve_license_id(declared, reviewed)
    properties = license_properties(recognized, reviewed) if recognized else None
    if properties is not None:
        reason = None
    elif recognized is not None:
        reason = f"{recognized} has no properties row in ftpipe/compliance/license_table.py"
    elif declared.lower() in HF_IDS_NAMING_NO_LICENSE:
        reason = HF_IDS_NAMING_NO_LICENSE[declared.lower()]
    else:
        reason = (f"{declared!r} is not an SPDX id, a LicenseRef- id of ftpipe/compliance/license_table.py or a known "
                  f"Hugging Face id")
    return LicenseTerm(declared, _named_id(declared, reviewed), exception, properties, reason)


def parse_license(role: Role, declaration: LicenseDeclaration,
                  reviewed: Sequence[LicenseProperties] = ()) -> list[Option]:
    """The options a declared expression offers (one per way of resolving its ORs), its ids resolved against the
    table and the `reviewed` rows; LicenseError if the declaration is missing or not a valid expression."""
    where = f"{role} {declaration.name!r}"
    declared = declaration.license
    if declared is not None and not isinstance(declared, str):
        raise LicenseError(f"{where}: license must be text, got {declared!r}; expected {EXPECTED_FORM}")
    try:
        # strict: an exception id is accepted only after WITH, a license id only outside it.
        expression = _spdx().parse(declared or "", validate=False, strict=True)
    except ExpressionError as err:
        raise LicenseError(f"{where}: license {declared!r} is not a valid license expression ({err}); "
                           f"expected {EXPECTED_FORM}") from None
    if expression is None:
        raise LicenseError(f"{where}: no license declared; expected {EXPECTED_FORM}")
    return _options(expression, reviewed)


def _options(node: Any, reviewed: Sequence[LicenseProperties]) -> list[Option]:
    if isinstance(node, LicenseWithExceptionSymbol):
        return [(_term(node.license_symbol.key, node.exception_symbol.key, reviewed),)]
    if isinstance(node, LicenseSymbol):
        return [(_term(node.key, None, reviewed),)]
    children = [_options(child, reviewed) for child in node.args]
    if isinstance(node, _spdx().OR):
        return [option for child in children for option in child]
    # AND: every combination of the children's options, each license once.
    return [tuple(dict.fromkeys(term for option in combination for term in option))
            for combination in itertools.product(*children)]


def _violations(role: Role, name: str, option: Option, policy: LicensePolicy) -> list[dict[str, str]]:
    violations = []
    for term in option:
        props, license_id = term.properties, term.license_id
        rules = []
        if props is None and policy.unknown_blocks:
            rules.append(("unknown-license", f"is unknown ({term.unknown_reason}), and unknown_blocks is true"))
        if props is not None and props.no_derivatives:
            rules.append(("no-derivatives", "forbids derivatives, and a fine-tuned model is a derivative"))
        if props is not None and not props.commercial_use and INTENDED_USES[policy.intended_use]:
            rules.append(("non-commercial", "forbids commercial use, and intended_use is 'commercial'"))
        if license_id in policy.denied_licenses:
            rules.append(("denied", "is in denied_licenses"))
        if policy.allowed_licenses and license_id not in policy.allowed_licenses:
            rules.append(("not-allowed", "is not in allowed_licenses"))
        violations += [{"source": name, "role": role, "license": term.display(), "rule": rule, "reason": reason,
                        "fix": FIXES[rule].format(remove=REMOVE[role], license=term.display())}
                       for rule, reason in rules]
    return violations


def _restrictiveness(option: Option) -> tuple[int, ...]:
    """Lower is less restrictive; the order of the module docstring."""
    known = [term.properties for term in option if term.properties is not None]
    return (sum(props.no_derivatives for props in known), len(option) - len(known),
            sum(not props.commercial_use for props in known),
            max((COPYLEFT_RANK[props.copyleft] for props in known), default=0),
            sum(props.attribution is not None for props in known), len(option))


def _choose(role: Role, name: str, options: list[Option], policy: LicensePolicy) -> Option:
    return min(options, key=lambda option: (len(_violations(role, name, option, policy)), _restrictiveness(option),
                                            _render(option)))


def _render(option: Option) -> str:
    return " AND ".join(sorted({term.render() for term in option}, key=str.lower))


def conclude_licenses(base_model: LicenseDeclaration, data_sources: Sequence[LicenseDeclaration],
                      policy: LicensePolicy,
                      reviewed_licenses: Sequence[ReviewedLicenseProperties] = ()) -> dict[str, Any]:
    """The fine-tuned model's concluded license, obligations, verdict and violations (a JSON-ready dict), with
    the `reviewed_licenses` rows (reviewed_license_properties) used as rows of ftpipe/compliance/license_table.py.
    Raises LicenseError, listing every input at fault, if a declaration is missing or unparseable."""
    _check_reviewed(reviewed_licenses)
    inputs = [("base model", base_model)] + [("data source", source) for source in data_sources]
    parsed, errors = [], []
    for role, declaration in inputs:
        try:
            parsed.append((role, declaration, parse_license(role, declaration, reviewed_licenses)))
        except LicenseError as err:
            errors.append(str(err))
    if errors:
        raise LicenseError("\n".join(errors))
    # Every key now, in the order a report shows them; the totals are filled in after the loop.
    conclusion: dict[str, Any] = {"policy": {"intended_use": policy.intended_use,
                                             "allowed_licenses": list(policy.allowed_licenses),
                                             "denied_licenses": list(policy.denied_licenses),
                                             "unknown_blocks": policy.unknown_blocks},
                                  "verdict": "pass", "concluded_license": "", "commercial_use": "allowed",
                                  "commercial_use_allowed": True, "inputs": [], "share_alike": [], "attribution": [],
                                  "non_commercial_sources": [], "unknown_licenses": [], "reviewed_licenses": [],
                                  "notes": [], "violations": []}
    chosen_terms: list[LicenseTerm] = []
    for role, declaration, options in parsed:
        option = _choose(role, declaration.name, options, policy)
        chosen_terms += option
        _record_input(conclusion, role, declaration, option, len(options) > 1)
        conclusion["violations"] += _violations(role, declaration.name, option, policy)
    conclusion["concluded_license"] = _render(tuple(chosen_terms))
    conclusion["commercial_use"] = commercial_use(chosen_terms)
    conclusion["commercial_use_allowed"] = conclusion["commercial_use"] == "allowed"
    conclusion["verdict"] = "fail" if conclusion["violations"] else "pass"
    return conclusion


def commercial_use(terms: Sequence[LicenseTerm]) -> Literal["allowed", "not allowed", "unknown"]:
    """"not allowed" if a known license forbids it; else "unknown" if a license is unknown; else "allowed"."""
    known = [term.properties for term in terms if term.properties is not None]
    if not all(props.commercial_use for props in known):
        return "not allowed"
    return "unknown" if len(known) < len(terms) else "allowed"


def commercial_use_of(conclusion: dict[str, Any]) -> str:
    """A conclusion's "allowed", "not allowed" or "unknown"; conclusions written before the field existed hold
    only commercial_use_allowed, and the unknown and non-commercial lists it was derived from."""
    if conclusion.get("commercial_use"):
        return conclusion["commercial_use"]
    if conclusion["commercial_use_allowed"]:
        return "allowed"
    unknown_only = conclusion.get("unknown_licenses") and not conclusion.get("non_commercial_sources")
    return "unknown" if unknown_only else "not allowed"


def _record_input(conclusion: dict[str, Any], role: Role, declaration: LicenseDeclaration, option: Option,
                  was_choice: bool) -> None:
    """Add one input's chosen licenses to the conclusion's per-input lists and notes."""
    name, chosen = declaration.name, _render(option)
    where = f"{role} {name!r}"
    conclusion["inputs"].append({"role": role, "name": name, "declared": declaration.license, "chosen": chosen})
    notes = conclusion["notes"]
    if was_choice:
        notes.append(f"{where}: {declaration.license!r} offers a choice; chose {chosen!r}, the least restrictive "
                     f"option for intended_use {conclusion['policy']['intended_use']!r}")
    for term in option:
        license_id, props = term.display(), term.properties
        if term.exception:
            notes.append(f"{where}: {license_id}: the obligations are those of {term.license_id or term.declared}; "
                         f"the exception {term.exception} is recorded, not evaluated")
        if props is None:
            conclusion["unknown_licenses"].append({"source": name, "license": term.declared,
                                                   "reason": term.unknown_reason})
            notes.append(f"{where}: {term.declared} is unknown ({term.unknown_reason}): its obligations were "
                         f"not checked and commercial use cannot be confirmed")
            continue
        if isinstance(props, ReviewedLicenseProperties):
            _record_reviewed(conclusion, name, props)
            notes.append(f"{where}: {props.license_id} was reviewed by {props.reviewed_by}; its properties come "
                         f"from {REVIEWED_IN}")
        if props.share_alike:
            conclusion["share_alike"].append({"source": name, "license": license_id, "copyleft": props.copyleft})
        if props.attribution:
            conclusion["attribution"].append({"source": name, "license": license_id, "notice": props.attribution})
        if not props.commercial_use:
            conclusion["non_commercial_sources"].append({"source": name, "license": license_id})
        if props.notes:
            notes.append(f"{where}: {license_id}: {props.notes}")


def _record_reviewed(conclusion: dict[str, Any], name: str, props: ReviewedLicenseProperties) -> None:
    """List a reviewed license once, with every input that uses it."""
    for entry in conclusion["reviewed_licenses"]:
        if entry["id"] == props.license_id:
            if name not in entry["used_by"]:
                entry["used_by"].append(name)
            return
    conclusion["reviewed_licenses"].append({
        "id": props.license_id, "name": props.name, "url": props.url,
        "properties": {"commercial_use": props.commercial_use, "copyleft": props.copyleft,
                       "no_derivatives": props.no_derivatives, "attribution": props.attribution,
                       "notes": props.notes},
        "reviewed_by": props.reviewed_by, "used_by": [name]})


def format_violations(conclusion: dict[str, Any]) -> str:
    """The gate's error message: every violation with its fix, then the ways out."""
    violations = conclusion["violations"]
    lines = [f"license gate failed for intended_use {conclusion['policy']['intended_use']!r}: {len(violations)} "
             f"violation{'s' if len(violations) != 1 else ''}"]
    for violation in violations:
        lines.append(f"  - {violation['role']} {violation['source']!r}: {violation['license']} "
                     f"[{violation['rule']}] {violation['reason']}; fix: {violation['fix']}")
    lines.append("To fix: change intended_use, remove the source (or choose another base model), or change the "
                 "license policy (allowed_licenses, denied_licenses, unknown_blocks).")
    return "\n".join(lines)


def enforce_license_gate(conclusion: dict[str, Any]) -> None:
    """Raise LicenseGateError, listing every violation, unless the conclusion's verdict is pass."""
    if conclusion["verdict"] != "pass":
        raise LicenseGateError(format_violations(conclusion), conclusion["violations"])
