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
(decontamination), so the evaluation never scores a question the model was trained on. Hostile input is repaired or rejected, never a crash: every
input row ends up either in a split or in rejected.jsonl with its source, row and reason
(rows ingest could not parse included): summary.json shows the counts add up.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

from tqdm import tqdm

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.core.errors import PipelineError, run_stage
from ftpipe.core.io import atomic_dir, read_json, read_jsonl, write_json, write_jsonl
from ftpipe.core.params import CleanParams, Params, flatten, load_params
from ftpipe.core.paths import CLEAN_DIR, PROVENANCE_FILE, RAW_DIR, SPLITS, metrics_file
from ftpipe.core.provenance import stage_record
from ftpipe.data import near_dup, pii
from ftpipe.tracking.runs import stage_run

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system"}
RECORD_FORMATS = ("alpaca (instruction, input?, output)", "chat (messages: [{role, content}])",
                  "sharegpt (conversations: [{from, value}])", "prompt/completion")
ROLES = {"system", "user", "assistant"}
BLANK_LINE_RUN = re.compile(r"\n{3,}")
TRAILING_SPACE = re.compile(r"[ \t]+\n")
# Control characters (Unicode category Cc: C0, DEL, C1) other than newline and tab: NUL and friends
# are never meaningful in training text and break tokenizers and viewers, so normalize drops them
# (and clean counts the rows repaired).
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")   # \r: a line ending, normalized
# A record with more text than this is rejected before it is normalized or compared: no training
# example is near it (clean.max_answer_chars would reject it anyway), and a multi-megabyte record
# must not be copied around several times. Ingest applies the same limit while reading.
MAX_RECORD_CHARS = 1 << 20
# Why ingest could not turn a row into a record (its "error" text starts with the key).
INGEST_ERRORS = {"malformed JSON": "malformed_json", "not an object": "not_an_object",
                 "record too large": "record_too_large", "nested too deeply": "too_deeply_nested",
                 "malformed CSV": "malformed_csv"}


class RecordRejected(ValueError):
    """A record that cannot become a training example: `reason` is the rejected.jsonl reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class UnknownFormat(RecordRejected):
    def __init__(self, detail: str):
        super().__init__("unknown_format", detail)


def to_messages(record: dict) -> tuple[str, list[dict]]:
    """Recognise a record's format and return (format name, messages); raise RecordRejected when a
    field is missing or has the wrong type, UnknownFormat when no format matches. A plain `text`
    record has no turns at all (it is rejected later: no assistant turn to learn from)."""
    if "messages" in record:
        messages = []
        for number, turn in enumerate(_turns(record["messages"], "messages"), start=1):
            if "role" not in turn:
                raise RecordRejected("missing_field", f"messages turn {number} has no 'role'")
            if "content" not in turn:
                raise RecordRejected("missing_field", f"messages turn {number} has no 'content'")
            messages.append({"role": _role(turn["role"], f"messages turn {number}"),
                             "content": _text(turn["content"], f"messages turn {number} 'content'")})
        return "chat", messages
    if "conversations" in record:
        messages = []
        for number, turn in enumerate(_turns(record["conversations"], "conversations"), start=1):
            where = f"conversations turn {number}"
            if "from" not in turn and "role" not in turn:
                raise RecordRejected("missing_field", f"{where} has no 'from' (or 'role')")
            if "value" not in turn and "content" not in turn:
                raise RecordRejected("missing_field", f"{where} has no 'value' (or 'content')")
            speaker = _role(turn.get("from", turn.get("role")), where).lower()
            messages.append({"role": SHAREGPT_ROLES.get(speaker, speaker),
                             "content": _text(turn.get("value", turn.get("content")), f"{where} 'value'")})
        return "sharegpt", messages
    if "instruction" in record and "output" in record:
        prompt = _text(record["instruction"], "'instruction'")
        extra = _text(record.get("input"), "'input'")
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": _text(record["output"], "'output'")}]
        system = _text(record.get("system"), "'system'")
        if system.strip():
            messages.insert(0, {"role": "system", "content": system})
        return "alpaca", messages
    if "prompt" in record and "completion" in record:
        return "prompt_completion", [{"role": "user", "content": _text(record["prompt"], "'prompt'")},
                                     {"role": "assistant", "content": _text(record["completion"], "'completion'")}]
    if "text" in record:
        _text(record["text"], "'text'")
        return "text", []
    keys = [str(key)[:50] for key in sorted(record, key=str)[:10]]
    raise UnknownFormat(f"unknown record format (keys: {keys}{', ...' if len(record) > 10 else ''}); "
                        f"supported: {'; '.join(RECORD_FORMATS)}")


def _turns(value: object, key: str) -> list[dict]:
    if not isinstance(value, list):
        raise RecordRejected("bad_field_type", f"'{key}' must be a list of objects, got {type(value).__name__}")
    for number, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            raise RecordRejected("bad_field_type",
                                 f"'{key}' must be a list of objects; turn {number} is {type(turn).__name__}")
    return value


def _role(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise RecordRejected("bad_field_type", f"{where}: the role must be a string, got {type(value).__name__}")
    return value


def _text(value: object, where: str = "field") -> str:
    """A text field: a string; None is empty; a number or boolean becomes its JSON text; anything else
    (an object, a list) is rejected: guessing how to flatten it would invent training text."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return json.dumps(value)
    raise RecordRejected("bad_field_type", f"{where} must be a string, got {type(value).__name__}")


def structure_reason(messages: list[dict]) -> tuple[str, str] | None:
    """(reason, detail) when the turns cannot be trained with assistant-only loss: known roles only,
    an optional single system turn first, then user/assistant alternating, ending with the assistant."""
    roles = [m["role"] for m in messages]
    unknown = [role for role in roles if role not in ROLES]
    if unknown:
        return "unknown_role", f"role {unknown[0][:50]!r}; allowed: {sorted(ROLES)}"
    if "assistant" not in roles:
        return None   # rejection_reason says no_assistant_turn
    body = roles[1:] if roles[0] == "system" else roles
    for position, role in enumerate(body):
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            return "bad_role_order", f"turn {position + 1 + len(roles) - len(body)} is {role!r}, expected {expected!r}"
    if roles[-1] != "assistant":
        return "last_turn_not_assistant", f"the last turn is {roles[-1]!r}"
    return None


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = CONTROL_CHARS.sub("", text)
    text = TRAILING_SPACE.sub("\n", text)
    return BLANK_LINE_RUN.sub("\n\n", text).strip()


def content_id(messages: list[dict]) -> str:
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def assign_split(row_id: str, params: CleanParams) -> str:
    """Deterministic split from the content hash: a row's split never depends on other rows."""
    digest = hashlib.sha256(f"{params.split_salt}:{row_id}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < params.test_fraction:
        return "test"
    if position < params.test_fraction + params.validation_fraction:
        return "validation"
    return "train"


def rejection_reason(messages: list[dict], params: CleanParams) -> str | None:
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if not answers:
        return "no_assistant_turn"
    if any(not answer for answer in answers):
        return "empty_answer"
    placeholders = {p.lower() for p in params.placeholder_answers}
    if any(answer.lower().strip(" .!") in placeholders or answer.lower() in placeholders for answer in answers):
        return "placeholder_answer"
    if any(len(answer) < params.min_answer_chars for answer in answers):
        return "answer_too_short"
    if any(len(answer) > params.max_answer_chars for answer in answers):
        return "answer_too_long"
    if sum(len(m["content"]) for m in messages if m["role"] != "assistant") > params.max_prompt_chars:
        return "prompt_too_long"
    return None


def _recognise(raw: dict) -> tuple[str | None, list[dict], str | None, str | None]:
    """(format, messages, reason, detail) for one raw row; reason is None while the row may be kept."""
    if "error" in raw:   # ingest could not read this row into a record: quarantine it as it is
        error = str(raw["error"])
        reason = next((key for prefix, key in INGEST_ERRORS.items() if error.startswith(prefix)), "unreadable_row")
        return None, [], reason, error
    record = raw.get("record")
    if not isinstance(record, dict):
        return None, [], "not_an_object", f"expected a JSON object, got {type(record).__name__}"
    try:
        fmt, messages = to_messages(record)
    except RecordRejected as err:
        return None, [], err.reason, err.detail
    size = sum(len(m["content"]) for m in messages)
    if size > MAX_RECORD_CHARS:
        return fmt, [], "record_too_large", f"{size} characters of text (limit {MAX_RECORD_CHARS})"
    problem = structure_reason(messages)
    if problem is not None:
        return fmt, [], problem[0], problem[1]
    if not messages:   # a plain `text` record: nothing to learn the assistant's turns from
        return fmt, [], "no_assistant_turn", "a plain 'text' record has no assistant turn"
    return fmt, messages, None, None


def redact_record(value: object) -> object:
    """A quarantined record with every PII finding in its strings replaced by a placeholder:
    rejected.jsonl shows why a row was dropped without keeping the personal data it held."""
    return pii.redact_value(value)[0]


def find_and_treat_pii(messages: list[dict], action: str) -> tuple[list[dict], Counter]:
    """(messages with PII replaced by typed placeholders, counts by kind). With action "reject"
    the caller drops the row, but still only ever sees the redacted text."""
    found: Counter = Counter()
    redacted = []
    for message in messages:
        text, counts = pii.redact(message["content"])
        found.update(counts)
        redacted.append({"role": message["role"], "content": text})
    return redacted, found


def conversation_text(messages: list[dict], roles: set[str] | None = None) -> str:
    return "\n".join(m["content"] for m in messages if roles is None or m["role"] in roles)


def _prompts(rows: list[dict]) -> list[tuple[str, str]]:
    """(id, the text of the system and user turns): what decontamination compares."""
    return [(row["id"], conversation_text(row["messages"], {"system", "user"})) for row in rows]


def _quarantine(raw: dict, name: str, reason: str, detail: str | None) -> dict:
    entry = {"source": name, "row": raw.get("row"), "reason": reason, "detail": detail,
             "record": redact_record(raw.get("record"))}
    if "error" in raw:
        entry["text"] = redact_record(raw.get("text"))
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
            fmt, messages, reason, detail = _recognise(raw)
            if fmt is not None:
                formats[fmt] += 1
            if reason is None:
                if any(CONTROL_CHARS.search(m["content"]) for m in messages):
                    control_rows += 1
                messages = [{"role": m["role"], "content": normalize(m["content"])} for m in messages]
                messages, found = find_and_treat_pii(messages, params.pii_action)
                found.update(raw.get("pii", {}))   # what ingest already redacted (ingest.keep_pii_in_raw: false)
                if found:
                    pii_rows += 1
                    pii_found.update(found)
                    if params.pii_action == "reject":
                        reason = "pii"
                        detail = "contains " + ", ".join(f"{kind} ({n})" for kind, n in sorted(found.items()))
                if reason is None:
                    reason = rejection_reason(messages, params)
                row_id = content_id(messages)
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
    _, near_dups = near_dup.deduplicate([(row["id"], conversation_text(row["messages"])) for row in candidates],
                                        params.near_duplicate_threshold)
    splits: dict[str, list] = {split: [] for split in SPLITS}
    late_rejects: dict[str, tuple[dict, str, str]] = {}   # decided over all rows at once
    for row in candidates:
        if row["id"] in near_dups:
            match, similarity = near_dups[row["id"]]
            late_rejects[row["id"]] = (row, "near_duplicate", f"Jaccard {similarity:.2f} with {where[match]} (kept)")
            continue
        splits[assign_split(row["id"], params)].append(row)
    contaminated = near_dup.find_contaminated(_prompts(splits["train"]), _prompts(splits["validation"] + splits["test"]),
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
    params = load_params()
    stage_params = tracked_params(params)
    with stage_run("clean", stage_params) as tracker:
        splits, rejected, summary = clean_sources(RAW_DIR, params.clean)
        with atomic_dir(CLEAN_DIR) as out_dir:
            for split, rows in splits.items():
                write_jsonl(out_dir / f"{split}.jsonl", sorted(rows, key=lambda row: row["id"]))
            write_jsonl(out_dir / "rejected.jsonl", rejected)
            write_json(out_dir / "summary.json", summary)
            write_json(out_dir / PROVENANCE_FILE, stage_record("clean", stage_params, mlflow=tracker.reference()))
        metrics = {"rows_in": summary["rows_in"], "rejected": len(rejected),
                   **{f"rows_{split}": n for split, n in summary["kept"].items()},
                   "near_duplicates": summary["rejected"].get("near_duplicate", 0),
                   "decontaminated": summary["rejected"].get("contaminates_evaluation", 0),
                   "pii_rows": summary["pii"]["rows"], "sources_all_rejected": len(all_rejected_sources(summary)),
                   **{f"pii_{kind}": n for kind, n in summary["pii"]["found"].items()}}
        write_json(metrics_file("clean"), metrics)
        tracker.log_metrics(metrics)
        tracker.log_artifact(CLEAN_DIR / "summary.json")
        for raw in sorted(RAW_DIR.glob("*.jsonl")):
            tracker.log_input(raw, f"raw/{raw.stem}", "source")
        for split in splits:
            tracker.log_input(CLEAN_DIR / f"{split}.jsonl", f"clean/{split}", split)
    for name in all_rejected_sources(summary):
        reasons = summary["sources"][name]["rejected"]
        print(f"warning: clean: every row of source '{name}' was rejected ({summary['sources'][name]['rows_in']} rows: "
              f"{', '.join(f'{reason} {n}' for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])) or 'none'}); "
              f"see {CLEAN_DIR}/rejected.jsonl", file=sys.stderr)
    print(f"clean: {summary['rows_in']} rows in -> {summary['kept']}, rejected {summary['rejected']}; "
          f"PII ({summary['pii']['action']}): {summary['pii']['found'] or 'none'} in {summary['pii']['rows']} rows")


if __name__ == "__main__":
    run_stage(main)
