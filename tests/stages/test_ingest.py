"""Stage `ingest`: ingest_source (provenance, max_rows, PII, the stdlib source), empty sources, and main().
Reading the files is tested in tests/data/test_readers.py, the stdlib source in tests/data/test_stdlib_docstrings.py."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import read_json, read_jsonl, sha256_file
from ftpipe.core.params import SourceParams
from stages import ingest
from stages.ingest import ingest_source
from tests.conftest import REPO, set_sources
from tests.data_fixtures import alpaca, write_lines

QUESTION = re.compile(r"^What does `([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+)` do\?$")




# --- ingest_source -----------------------------------------------------------------------------

def file_source(name: str, path: str, max_rows: int | None = None) -> SourceParams:
    return SourceParams(name=name, type="file", path=path, max_rows=max_rows)


def test_invalid_utf8_is_replaced_and_counted(in_tmp_project):
    path = Path("data/sources/bad.jsonl")
    path.parent.mkdir(parents=True)
    path.write_bytes(json.dumps(alpaca(1)).encode() + b"\n" + b'{"instruction": "caf\xe9?", "output": "ok"}\n')
    Path("out").mkdir()
    entry = ingest_source(file_source("bad", str(path)), Path("out"), keep_pii=False)
    assert entry["repaired"] == {"invalid_utf8": 1} and entry["rows"] == 2
    assert read_jsonl(Path("out/bad.jsonl"))[1]["record"]["instruction"] == "caf\ufffd?"


def test_ingest_source_writes_rows_and_provenance(in_tmp_project, capsys):
    data = write_lines(Path("data/sources/mine.jsonl"), [json.dumps(alpaca(i)) for i in range(1, 6)])
    out_dir = Path("out")
    out_dir.mkdir()
    entry = ingest_source(file_source("mine", "data/sources/mine.jsonl"), out_dir, keep_pii=False)
    assert entry["name"] == "mine" and "license" not in entry   # declared under compliance.sources
    assert entry["origin"] == {"kind": "file", "path": "data/sources/mine.jsonl", "sha256": sha256_file(data)}
    assert entry["rows"] == 5 and entry["file"] == "mine.jsonl"
    assert entry["sha256"] == sha256_file(out_dir / "mine.jsonl")
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$", entry["retrieved_at"])
    assert read_jsonl(out_dir / "mine.jsonl") == [{"row": i, "record": alpaca(i)} for i in range(1, 6)]
    assert "warning" not in capsys.readouterr().out


def test_ingest_source_honours_max_rows(in_tmp_project):
    write_lines(Path("data/sources/mine.jsonl"), [json.dumps(alpaca(i)) for i in range(1, 11)])
    out_dir = Path("out")
    out_dir.mkdir()
    entry = ingest_source(file_source("mine", "data/sources/mine.jsonl", max_rows=3), out_dir, keep_pii=False)
    assert entry["rows"] == 3
    assert [row["row"] for row in read_jsonl(out_dir / "mine.jsonl")] == [1, 2, 3]


def test_max_rows_counts_rows_not_line_numbers(in_tmp_project):
    # blank lines do not count: max_rows=3 keeps three rows (lines 1, 3 and 5) when the file has more
    lines = [json.dumps(alpaca(1)), "", json.dumps(alpaca(3)), "", json.dumps(alpaca(5)), json.dumps(alpaca(6))]
    write_lines(Path("data/sources/gappy.jsonl"), lines)
    out_dir = Path("out")
    out_dir.mkdir()
    entry = ingest_source(file_source("gappy", "data/sources/gappy.jsonl", max_rows=3), out_dir, keep_pii=False)
    assert entry["rows"] == 3
    assert [row["row"] for row in read_jsonl(out_dir / "gappy.jsonl")] == [1, 3, 5]


def test_ingest_source_stdlib_max_rows(in_tmp_project):
    out_dir = Path("out")
    out_dir.mkdir()
    source = SourceParams(name="docs", type="python_stdlib_docstrings", max_rows=7)
    entry = ingest_source(source, out_dir, keep_pii=False)
    assert entry["rows"] == 7 and entry["origin"]["kind"] == "python-stdlib"
    rows = read_jsonl(out_dir / "docs.jsonl")
    assert [row["row"] for row in rows] == list(range(1, 8))
    assert all(QUESTION.match(row["record"]["instruction"]) for row in rows)


def test_missing_file_names_the_source(in_tmp_project):
    Path("out").mkdir()
    with pytest.raises(PipelineError) as error:
        ingest_source(file_source("tickets", "data/sources/tickets.jsonl"), Path("out"), keep_pii=False)
    message = str(error.value)
    assert "ingest.sources 'tickets'" in message and "data/sources/tickets.jsonl does not exist" in message
    assert "data/sources/" in message


def test_file_outside_sources_folder_warns(in_tmp_project, capsys):
    write_lines(Path("elsewhere/d.jsonl"), [json.dumps(alpaca(1))])
    Path("out").mkdir()
    entry = ingest_source(file_source("d", "elsewhere/d.jsonl"), Path("out"), keep_pii=False)
    assert entry["rows"] == 1
    out = capsys.readouterr().out
    assert "warning: elsewhere/d.jsonl is outside data/sources/" in out and "dvc repro -f ingest" in out


# --- main() ------------------------------------------------------------------------------------

def write_params(sources: list[dict]) -> None:
    data = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    set_sources(data, sources)
    Path("params.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def test_main_writes_raw_data_provenance_and_metrics(in_tmp_project, capsys):
    write_lines(Path("data/sources/mine.jsonl"), [json.dumps(alpaca(i)) for i in range(1, 5)])
    path = Path("data/sources/other.csv")
    path.write_text("prompt,completion\nP1?,Completion one is here.\nP2?,Completion two is here.\n", encoding="utf-8")
    write_params([{"name": "mine", "type": "file", "path": "data/sources/mine.jsonl"},
                  {"name": "other", "type": "file", "path": "data/sources/other.csv",
                   "max_rows": 1}])
    ingest.main()

    assert read_jsonl(Path("data/raw/mine.jsonl")) == [{"row": i, "record": alpaca(i)} for i in range(1, 5)]
    assert read_jsonl(Path("data/raw/other.jsonl")) == [
        {"row": 1, "record": {"prompt": "P1?", "completion": "Completion one is here."}}]
    assert sorted(p.name for p in Path("data/raw").iterdir()) == ["mine.jsonl", "other.jsonl", "provenance.json"]
    assert sorted(p.name for p in Path("data").iterdir()) == ["raw", "sources"]   # no temp folder left

    provenance = read_json(Path("data/raw/provenance.json"))
    assert provenance["stage"] == "ingest"
    assert provenance["params"]["ingest.sources.0.name"] == "mine"
    assert provenance["params"]["ingest.sources.1.max_rows"] == 1
    assert {"git", "environment", "created_at"} <= set(provenance)
    sources = {s["name"]: s for s in provenance["sources"]}
    assert list(sources) == ["mine", "other"]
    assert sources["mine"]["rows"] == 4
    assert sources["mine"]["origin"] == {"kind": "file", "path": "data/sources/mine.jsonl",
                                         "sha256": sha256_file(Path("data/sources/mine.jsonl"))}
    assert sources["mine"]["sha256"] == sha256_file(Path("data/raw/mine.jsonl"))
    assert sources["other"]["rows"] == 1

    assert read_json(Path("metrics/ingest.json")) == {"rows_total": 5, "empty_sources": 0, "pii_rows_redacted": 0,
                                                      "rows.mine": 4, "rows.other": 1}
    out = capsys.readouterr().out
    assert "ingest: mine: 4 rows -> data/raw/mine.jsonl" in out


def test_main_failure_keeps_the_previous_raw_data(in_tmp_project):
    write_lines(Path("data/sources/mine.jsonl"), [json.dumps(alpaca(1))])
    write_params([{"name": "mine", "type": "file", "path": "data/sources/mine.jsonl"}])
    ingest.main()
    before = Path("data/raw/mine.jsonl").read_text(encoding="utf-8")

    write_params([{"name": "mine", "type": "file", "path": "data/sources/mine.json"}])
    Path("data/sources/mine.json").write_text(json.dumps(alpaca(1)), encoding="utf-8")   # not an array
    with pytest.raises(PipelineError, match=r"mine\.json: a \.json source must hold an array"):
        ingest.main()
    assert Path("data/raw/mine.jsonl").read_text(encoding="utf-8") == before
    assert read_json(Path("metrics/ingest.json")) == {"rows_total": 1, "empty_sources": 0, "pii_rows_redacted": 0,
                                                      "rows.mine": 1}
    assert sorted(p.name for p in Path("data").iterdir()) == ["raw", "sources"]


@pytest.mark.parametrize("action", ["warn", "fail"])
def test_an_empty_source_is_named_with_a_warning_or_fails(in_tmp_project, capsys, action):
    write_lines(Path("data/sources/mine.jsonl"), [json.dumps(alpaca(1))])
    Path("data/sources/empty.jsonl").write_text("\n\n", encoding="utf-8")   # blank lines only: no record
    write_params([{"name": "mine", "type": "file", "path": "data/sources/mine.jsonl"},
                  {"name": "empty", "type": "file", "path": "data/sources/empty.jsonl"}])
    data = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
    data["ingest"]["empty_source"] = action
    Path("params.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    if action == "fail":
        with pytest.raises(PipelineError, match=r"ingest source 'empty' \(data/sources/empty.jsonl\) has no rows"):
            ingest.main()
        assert not Path("data/raw").exists()   # nothing published
        return
    ingest.main()
    assert "warning: ingest source 'empty' (data/sources/empty.jsonl) has no rows" in capsys.readouterr().err
    assert read_json(Path("metrics/ingest.json"))["empty_sources"] == 1


@pytest.mark.parametrize("keep", [False, True])
def test_raw_copies_keep_pii_only_when_params_say_so_and_clean_still_counts_it(in_tmp_project, keep):
    """data/raw (and so the DVC cache) holds no PII value unless ingest.keep_pii_in_raw; either way clean
    counts the rows that had some, and with clean.pii_action: reject drops them."""
    from ftpipe.core.params import load_params
    from stages.clean import clean_sources

    email, phone = "jane.doe@example.org", "+1 555 123 4567"
    records = [{"instruction": f"Write to {email}.", "output": f"Mail {email} or call {phone} today."},
               {"instruction": "Say hi.", "output": "Hello there, nice to meet you."}]
    write_lines(Path("data/sources/mail.jsonl"), [json.dumps(record) for record in records])
    Path("data/raw").mkdir(parents=True)
    entry = ingest_source(file_source("mail", "data/sources/mail.jsonl"), Path("data/raw"), keep_pii=keep)
    text = Path("data/raw/mail.jsonl").read_text(encoding="utf-8")
    assert (email in text and phone in text) == keep
    if keep:
        assert entry["pii_in_raw"] == "kept verbatim" and entry["pii_redacted"] == {"rows": 0, "found": {}}
    else:
        assert "[EMAIL]" in text and "[PHONE]" in text
        assert entry["pii_in_raw"] == "replaced by placeholders"
        assert entry["pii_redacted"] == {"rows": 1, "found": {"email": 2, "phone": 1}}
        assert read_jsonl(Path("data/raw/mail.jsonl"))[0]["pii"] == {"email": 2, "phone": 1}
    Path("data/raw/provenance.json").write_text(json.dumps({"sources": [entry]}), encoding="utf-8")

    write_params([{"name": "mail", "type": "file", "path": "data/sources/mail.jsonl"}])
    clean = load_params().clean
    for action in ("redact", "reject"):
        params = type(clean)(**{**clean.__dict__, "pii_action": action, "min_answer_chars": 5})
        splits, rejected, summary = clean_sources(Path("data/raw"), params)
        assert summary["sources"]["mail"]["pii"] == {"action": action, "rows": 1, "found": {"email": 2, "phone": 1}}
        kept = [row for rows in splits.values() for row in rows]
        assert all(email not in json.dumps(row) for row in kept + rejected)
        assert ([r["reason"] for r in rejected] == ["pii"]) == (action == "reject")
