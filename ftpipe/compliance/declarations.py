"""Where a declaration in params.yaml (compliance.sources) and what the pipeline found disagree. The report
lists each mismatch and the report stage warns: a reviewer signs off on the declarations."""
from __future__ import annotations

from typing import Any


def declaration_mismatches(sources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where a declaration and what the pipeline found disagree: a source declared personal_data: false in which
    PII was found (by ingest, which redacts the raw copy, or by clean). A reviewer must see it: the declaration
    (and its legal basis) is what the sign-off rests on."""
    mismatches = []
    for source in sources:
        pii_found = (source.get("pii") or {}).get("found") or {}
        if pii_found and not source["personal_data"]:
            kinds = ", ".join(f"{kind} ({count})" for kind, count in sorted(pii_found.items()))
            rows = source["pii"].get("rows", 0)
            mismatches.append({
                "source": source["name"], "field": "personal_data", "declared": False, "found": pii_found,
                "rows": rows, "action": source["pii"].get("action"),
                "message": f"data source {source['name']!r} is declared personal_data: false, but "
                           f"{rows} row{'' if rows == 1 else 's'} held personal data ({kinds}; "
                           f"{source['pii'].get('action')}ed by clean). Correct the declaration "
                           f"(personal_data: true and its legal basis) or the data."})
    return mismatches
