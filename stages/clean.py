"""Stage `clean`: raw sources -> one canonical chat schema, split into train/validation/test.

    python -m stages.clean

Reads every data/raw/<source>.jsonl written by ingest. Each record is recognised as one of
Alpaca (instruction/input/output), chat `messages`, ShareGPT `conversations` or
prompt/completion, turned into {"role", "content"} messages, normalized (Unicode NFC,
line endings, trailing spaces, blank-line runs), filtered by the params' length limits,
placeholder answers and exact duplicates, and split by a hash of its content, so adding
rows never moves existing ones. Every input row ends up either in a split or in
rejected.jsonl with its reason: summary.json shows the counts add up.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.errors import PipelineError, run_stage
from ftpipe.io import atomic_dir, read_json, read_jsonl, write_json, write_jsonl
from ftpipe.params import CleanParams, Params, flatten, load_params
from ftpipe.paths import CLEAN_DIR, PROVENANCE_FILE, RAW_DIR, SPLITS, metrics_file
from ftpipe.provenance import stage_record
from ftpipe.tracking import stage_run

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system"}
RECORD_FORMATS = ("alpaca (instruction, input?, output)", "chat (messages: [{role, content}])",
                  "sharegpt (conversations: [{from, value}])", "prompt/completion")
BLANK_LINE_RUN = re.compile(r"\n{3,}")
TRAILING_SPACE = re.compile(r"[ \t]+\n")


class UnknownFormat(ValueError):
    pass


def to_messages(record: dict) -> tuple[str, list[dict]]:
    """Recognise a record's format and return (format name, messages)."""
    if "messages" in record:
        return "chat", [{"role": str(m.get("role", "")), "content": _text(m.get("content"))}
                        for m in _turns(record["messages"], "messages")]
    if "conversations" in record:
        messages = []
        for turn in _turns(record["conversations"], "conversations"):
            speaker = str(turn.get("from", turn.get("role", ""))).lower()
            messages.append({"role": SHAREGPT_ROLES.get(speaker, speaker),
                             "content": _text(turn.get("value", turn.get("content")))})
        return "sharegpt", messages
    if "instruction" in record and "output" in record:
        prompt = _text(record["instruction"])
        if _text(record.get("input")).strip():
            prompt = f"{prompt}\n\n{_text(record['input'])}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record["output"])}]
        if _text(record.get("system")).strip():
            messages.insert(0, {"role": "system", "content": _text(record["system"])})
        return "alpaca", messages
    if "prompt" in record and "completion" in record:
        return "prompt_completion", [{"role": "user", "content": _text(record["prompt"])},
                                     {"role": "assistant", "content": _text(record["completion"])}]
    raise UnknownFormat(f"unknown record format (keys: {sorted(record)[:10]})")


def _turns(value: object, key: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(turn, dict) for turn in value):
        raise UnknownFormat(f"'{key}' must be a list of objects")
    return value


def _text(value: object) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
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


def clean_sources(raw_dir: Path, params: CleanParams) -> tuple[dict[str, list], list[dict], dict]:
    """Clean every source listed in raw_dir's provenance. Returns (splits, rejected, summary)."""
    sources = read_json(raw_dir / PROVENANCE_FILE)["sources"]
    splits: dict[str, list] = {split: [] for split in SPLITS}
    rejected: list[dict] = []
    seen: dict[str, str] = {}
    summary: dict = {"sources": {}}
    for source in sources:
        name, path = source["name"], raw_dir / source["file"]
        formats, reasons, kept = Counter(), Counter(), 0
        rows = read_jsonl(path)
        for raw in rows:
            try:
                fmt, messages = to_messages(raw["record"])
            except UnknownFormat as err:
                raise PipelineError(
                    f"source '{name}' (params.yaml ingest.sources), row {raw['row']}: {err}. "
                    f"Supported formats: {'; '.join(RECORD_FORMATS)}. Convert the file, or remove the row."
                ) from err
            formats[fmt] += 1
            messages = [{"role": m["role"], "content": normalize(m["content"])} for m in messages]
            reason = rejection_reason(messages, params)
            row_id = content_id(messages)
            detail = None
            if reason is None and row_id in seen:
                reason, detail = "duplicate", f"same content as {seen[row_id]}"
            if reason is not None:
                reasons[reason] += 1
                rejected.append({"source": name, "row": raw["row"], "reason": reason, "detail": detail,
                                 "record": raw["record"]})
                continue
            seen[row_id] = f"{name} row {raw['row']}"
            split = assign_split(row_id, params)
            splits[split].append({"id": row_id, "source": name, "source_row": raw["row"], "format": fmt,
                                  "messages": messages})
            kept += 1
        if kept + sum(reasons.values()) != len(rows):   # the promise: nothing is lost silently
            raise AssertionError(f"{name}: {len(rows)} rows in, {kept} kept + {sum(reasons.values())} rejected")
        summary["sources"][name] = {"rows_in": len(rows), "kept": kept, "rejected": dict(reasons),
                                    "formats": dict(formats), "license": source["license"]}
    summary["rows_in"] = sum(s["rows_in"] for s in summary["sources"].values())
    summary["kept"] = {split: len(rows) for split, rows in splits.items()}
    summary["rejected"] = dict(Counter(r["reason"] for r in rejected))
    if not splits["train"]:
        raise PipelineError(
            f"no training rows left after cleaning ({summary['rows_in']} rows in, rejected: {summary['rejected']}). "
            f"See the rejection reasons; relax the clean.* limits in params.yaml or add data."
        )
    return splits, rejected, summary


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
            write_json(out_dir / PROVENANCE_FILE, stage_record("clean", stage_params))
        metrics = {"rows_in": summary["rows_in"], "rejected": len(rejected),
                   **{f"rows_{split}": n for split, n in summary["kept"].items()}}
        write_json(metrics_file("clean"), metrics)
        tracker.log_metrics(metrics)
        tracker.log_artifact(CLEAN_DIR / "summary.json")
    print(f"clean: {summary['rows_in']} rows in -> {summary['kept']}, rejected {summary['rejected']}")


if __name__ == "__main__":
    run_stage(main)
