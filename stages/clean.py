"""Stage `clean`: raw sources -> one canonical chat schema, split into train/validation/test.

    python -m stages.clean

Reads every data/raw/<source>.jsonl written by ingest. Each record is recognised as one of
Alpaca (instruction/input/output), chat `messages`, ShareGPT `conversations`,
prompt/completion or plain `text`, turned into {"role", "content"} messages, checked for
structure (field types, roles, turn order), normalized (Unicode NFC, line endings, control
characters, trailing spaces, blank-line runs), searched for PII and secrets (redacted with
typed placeholders or rejected, per clean.pii_action; only counts by kind are reported),
filtered by the params' length limits, placeholder answers, exact and near-duplicates
(MinHash), and split by a hash of its content, so adding rows never moves existing ones.
Training rows whose prompt near-duplicates a validation or test prompt are dropped
(decontamination), so the evaluation never scores a question the model was trained on.
Hostile input is repaired or rejected, never a crash: every input row ends up either in a
split or in rejected.jsonl with its source, row and reason (rows ingest could not parse
included): summary.json shows the counts add up.

Recognising the formats is ftpipe.data.formats; normalization, the rejection reasons, content
ids and the split are ftpipe.data.rules; near-duplicates, ftpipe.data.near_dup.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.core.errors import PipelineError, run_stage
from ftpipe.core.io import read_json, read_jsonl, write_json, write_jsonl
from ftpipe.core.params import CleanParams, Params, flatten
from ftpipe.core.paths import CLEAN_DIR, PROVENANCE_FILE, RAW_DIR, SPLITS
from ftpipe.core.stage import Stage
from ftpipe.data import near_dup, pii, rules
from ftpipe.data.formats import recognise_row


def _prompts(rows: list[dict]) -> list[tuple[str, str]]:
    """(id, the text of the system and user turns): what decontamination compares."""
    return [(row["id"], rules.conversation_text(row["messages"], {"system", "user"})) for row in rows]


def _quarantine(raw: dict, name: str, reason: str, detail: str | None) -> dict:
    entry = {"source": name, "row": raw.get("row"), "reason": reason, "detail": detail,
             "record": rules.redact_record(raw.get("record"))}
    if "error" in raw:
        entry["text"] = rules.redact_record(raw.get("text"))
    return entry


def clean_sources(raw_dir: Path, params: CleanParams) -> tuple[dict[str, list], list[dict], dict]:
    """Clean every source listed in raw_dir's provenance. Returns (splits, rejected, summary).

    Row by row: recognise the format, check the structure, normalize, find PII (redact or reject),
    apply the length/placeholder filters and drop exact duplicates. Then, over all sources at once:
    drop near-duplicates (the first row of each group stays), split by content hash, and drop the
    training rows whose prompt near-duplicates a validation or test prompt (decontamination)."""
    sources = read_json(raw_dir / PROVENANCE_FILE)["sources"]
    rejected: list[dict] = []
    candidates: list[dict] = []   # rows that passed the per-row checks, in source and row order
    seen: dict[str, str] = {}
    summary: dict = {"sources": {}}
    for source in sources:
        name, path = source["name"], raw_dir / source["file"]
        formats, control_rows, pii_rows, pii_found = Counter(), 0, 0, Counter()
        rows = read_jsonl(path)
        # disable=None: a progress bar on a terminal, silence in logs and CI
        for raw in tqdm(rows, desc=f"clean {name}", unit=" rows", disable=None, mininterval=1.0):
            fmt, messages, reason, detail = recognise_row(raw)
            if fmt is not None:
                formats[fmt] += 1
            if reason is None:
                if any(rules.CONTROL_CHARS.search(m["content"]) for m in messages):
                    control_rows += 1
                messages = [{"role": m["role"], "content": rules.normalize(m["content"])} for m in messages]
                messages, found = rules.find_and_treat_pii(messages, params.pii_action)
                found.update(raw.get("pii", {}))   # what ingest already redacted (ingest.keep_pii_in_raw: false)
                if found:
                    pii_rows += 1
                    pii_found.update(found)
                    if params.pii_action == "reject":
                        reason = "pii"
                        detail = "contains " + ", ".join(f"{kind} ({n})" for kind, n in sorted(found.items()))
                if reason is None:
                    reason = rules.rejection_reason(messages, params)
                row_id = rules.content_id(messages)
                if reason is None and row_id in seen:
                    reason, detail = "duplicate", f"same content as {seen[row_id]}"
            if reason is not None:
                entry = _quarantine(raw, name, reason, detail)
                if reason == "pii":   # the record is gone from the data; show the redacted turns
                    entry["messages"] = messages
                rejected.append(entry)
                continue
            seen[row_id] = f"{name} row {raw['row']}"
            candidates.append({"id": row_id, "source": name, "source_row": raw["row"], "format": fmt,
                               "messages": messages})
        summary["sources"][name] = {
            "rows_in": len(rows), "formats": dict(formats),
            "repaired": {"control_chars": control_rows,
                         "invalid_utf8": source.get("repaired", {}).get("invalid_utf8", 0)},
            "pii": {"action": params.pii_action, "rows": pii_rows,
                    "found": {kind: pii_found[kind] for kind in pii.PII_KINDS if pii_found[kind]}},
        }

    where = {row["id"]: f"{row['source']} row {row['source_row']}" for row in candidates}
    _, near_dups = near_dup.deduplicate([(row["id"], rules.conversation_text(row["messages"])) for row in candidates],
                                        params.near_duplicate_threshold)
    splits: dict[str, list] = {split: [] for split in SPLITS}
    late_rejects: dict[str, tuple[dict, str, str]] = {}   # decided over all rows at once
    for row in candidates:
        if row["id"] in near_dups:
            match, similarity = near_dups[row["id"]]
            late_rejects[row["id"]] = (row, "near_duplicate", f"Jaccard {similarity:.2f} with {where[match]} (kept)")
            continue
        splits[rules.assign_split(row["id"], params)].append(row)
    contaminated = near_dup.find_contaminated(_prompts(splits["train"]),
                                              _prompts(splits["validation"] + splits["test"]),
                                              params.decontamination_threshold)
    eval_split = {row["id"]: split for split in ("validation", "test") for row in splits[split]}
    for row in splits["train"]:
        if row["id"] in contaminated:
            match, similarity = contaminated[row["id"]]
            late_rejects[row["id"]] = (row, "contaminates_evaluation",
                               f"prompt Jaccard {similarity:.2f} with the {eval_split[match]} example {match} "
                               f"({where[match]})")
    splits["train"] = [row for row in splits["train"] if row["id"] not in contaminated]
    for row, reason, detail in late_rejects.values():
        rejected.append({"source": row["source"], "row": row["source_row"], "reason": reason, "detail": detail,
                         "messages": row["messages"]})

    for name, entry in summary["sources"].items():
        reasons = Counter(r["reason"] for r in rejected if r["source"] == name)
        entry["kept"] = sum(row["source"] == name for rows in splits.values() for row in rows)
        entry["rejected"] = dict(sorted(reasons.items()))
        if entry["kept"] + sum(reasons.values()) != entry["rows_in"]:   # the promise: nothing is lost silently
            raise AssertionError(f"{name}: {entry['rows_in']} rows in, {entry['kept']} kept + "
                                 f"{sum(reasons.values())} rejected")
    summary["rows_in"] = sum(s["rows_in"] for s in summary["sources"].values())
    summary["kept"] = {split: len(rows) for split, rows in splits.items()}
    summary["rejected"] = dict(sorted(Counter(r["reason"] for r in rejected).items()))
    total_pii: Counter = Counter()
    for entry in summary["sources"].values():
        total_pii.update(entry["pii"]["found"])
    summary["pii"] = {"action": params.pii_action, "rows": sum(e["pii"]["rows"] for e in summary["sources"].values()),
                      "found": {kind: total_pii[kind] for kind in pii.PII_KINDS if total_pii[kind]}}
    if not splits["train"]:
        raise PipelineError(
            f"no training rows left after cleaning ({summary['rows_in']} rows in, rejected: {summary['rejected']}). "
            f"See the rejection reasons; relax the clean.* limits in params.yaml or add data."
        )
    return splits, rejected, summary


def all_rejected_sources(summary: dict) -> list[str]:
    """Sources that had rows and of which none was kept: named, so a user sees that a source taught nothing."""
    return [name for name, entry in summary["sources"].items() if entry["rows_in"] and not entry["kept"]]


def tracked_params(params: Params) -> dict:
    """The params.yaml keys this stage reads: dvc.yaml lists the same (tests/test_dvc_yaml.py)."""
    return flatten(params.clean, "clean")


def main() -> None:
    with Stage("clean", tracked_params) as stage:
        splits, rejected, summary = clean_sources(RAW_DIR, stage.params.clean)
        with stage.output() as out_dir:
            for split, rows in splits.items():
                write_jsonl(out_dir / f"{split}.jsonl", sorted(rows, key=lambda row: row["id"]))
            write_jsonl(out_dir / "rejected.jsonl", rejected)
            write_json(out_dir / "summary.json", summary)
        stage.finish({"rows_in": summary["rows_in"], "rejected": len(rejected),
                      **{f"rows_{split}": n for split, n in summary["kept"].items()},
                      "near_duplicates": summary["rejected"].get("near_duplicate", 0),
                      "decontaminated": summary["rejected"].get("contaminates_evaluation", 0),
                      "pii_rows": summary["pii"]["rows"], "sources_all_rejected": len(all_rejected_sources(summary)),
                      **{f"pii_{kind}": n for kind, n in summary["pii"]["found"].items()}})
        stage.tracker.log_artifact(CLEAN_DIR / "summary.json")
        for raw in sorted(RAW_DIR.glob("*.jsonl")):
            stage.tracker.log_input(raw, f"raw/{raw.stem}", "source")
        for split in splits:
            stage.tracker.log_input(CLEAN_DIR / f"{split}.jsonl", f"clean/{split}", split)
    for name in all_rejected_sources(summary):
        reasons = sorted(summary["sources"][name]["rejected"].items(), key=lambda kv: -kv[1])
        print(f"warning: clean: every row of source '{name}' was rejected ({summary['sources'][name]['rows_in']} rows: "
              f"{', '.join(f'{reason} {n}' for reason, n in reasons) or 'none'}); "
              f"see {CLEAN_DIR}/rejected.jsonl", file=sys.stderr)
    print(f"clean: {summary['rows_in']} rows in -> {summary['kept']}, rejected {summary['rejected']}; "
          f"PII ({summary['pii']['action']}): {summary['pii']['found'] or 'none'} in {summary['pii']['rows']} rows")


if __name__ == "__main__":
    run_stage(main)
