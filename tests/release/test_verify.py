"""python -m ftpipe.release.verify: a release that is what the pipeline produced passes; a changed artifact, card or
report is caught, even when the records next to it were changed to match."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import sha256_file
from ftpipe.release import verify
from stages import report
from tests.release_fixtures import GGUF_TYPES, build_finished_project

RELEASE = Path("models/release")


@pytest.fixture
def released(in_tmp_project) -> None:
    build_finished_project()
    report.main()


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def run_verify(capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        verify.main([])
    return exited.value.code, capsys.readouterr().out


def test_an_untouched_release_passes_every_check(released, capsys):
    verify.main([])
    out = capsys.readouterr().out
    assert "all checks passed" in out
    result = verify.verify()
    assert result["passed"] and set(result["checked"]) == {"manifest", "report", "stage records", "dvc.lock", "current",
                                                           "modelfiles"}
    assert all(count > 0 for count in result["checked"].values())


def test_a_tampered_gguf_is_caught_by_every_record(released, capsys):
    flip_a_byte(Path("models/gguf/model-q8_0.gguf"))
    code, out = run_verify(capsys)
    assert code == verify.MISMATCH_EXIT
    caught_by = {m["check"] for m in verify.verify()["mismatches"] if m["path"].endswith("model-q8_0.gguf")}
    assert caught_by == {"manifest", "report", "stage records", "dvc.lock", "modelfiles"}   # modelfiles: FROM's file
    assert "! models/gguf/model-q8_0.gguf: manifest check" in out and "Do not ship this release" in out


def test_a_tampered_card_is_caught(released, capsys):
    card = RELEASE / "merged/README.md"
    card.write_text(card.read_text().replace("Commercial use: not allowed", "Commercial use: allowed"))
    code, out = run_verify(capsys)
    assert code == verify.MISMATCH_EXIT and "! models/release/merged/README.md: manifest check" in out


def test_rewriting_the_report_and_manifest_to_match_is_still_caught(released):
    """Whoever swaps a GGUF and updates report.json and MANIFEST.sha256 to match still meets the stages'
    own records and dvc.lock."""
    gguf = Path("models/gguf/model-q8_0.gguf")
    old = sha256_file(gguf)
    flip_a_byte(gguf)
    new = sha256_file(gguf)
    for name in ("report.json", "MANIFEST.sha256"):
        path = RELEASE / name
        path.write_text(path.read_text().replace(old, new))
    manifest = RELEASE / "MANIFEST.sha256"   # and the report's own line in the manifest
    lines = [f"{sha256_file(RELEASE / 'report.json')}  models/release/report.json"
             if line.endswith("models/release/report.json") else line for line in manifest.read_text().splitlines()]
    manifest.write_text("\n".join(lines) + "\n")
    caught_by = {m["check"] for m in verify.verify()["mismatches"]}
    assert caught_by == {"stage records", "dvc.lock"}


def test_a_release_older_than_the_compliance_conclusion_is_stale(released, capsys):
    conclusion = Path("data/compliance/conclusion.json")
    data = json.loads(conclusion.read_text())
    data["conclusion"]["policy"]["intended_use"] = "internal"
    conclusion.write_text(json.dumps(data))
    code, out = run_verify(capsys)
    assert code == verify.MISMATCH_EXIT and "the release is stale (run `dvc repro`)" in out


def test_no_release_is_an_error_saying_what_to_run(in_tmp_project):
    with pytest.raises(PipelineError, match=r"models/release/report.json: not found. Run `dvc repro`"):
        verify.verify()


def test_each_gguf_folder_holds_a_modelfile_that_verify_checks(released):
    from ftpipe.gguf.modelfile import from_target

    manifest = {line.split("  ", 1)[1] for line in (RELEASE / "MANIFEST.sha256").read_text().splitlines()}
    for gguf_type in GGUF_TYPES:
        modelfile = RELEASE / f"gguf-{gguf_type}" / "Modelfile"
        assert from_target(modelfile.read_text()) == f"./model-{gguf_type}.gguf"
        assert modelfile.as_posix() in manifest
    assert verify.verify()["checked"]["modelfiles"] == 4 * len(GGUF_TYPES)   # listed, FROM, its file, BOM


def test_an_altered_modelfile_is_caught(released, capsys):
    modelfile = RELEASE / "gguf-q4_k_m/Modelfile"
    modelfile.write_text(modelfile.read_text().replace('PARAMETER stop "<|im_end|>"', 'PARAMETER stop "</s>"'))
    code, out = run_verify(capsys)
    assert code == verify.MISMATCH_EXIT
    caught_by = {m["check"] for m in verify.verify()["mismatches"] if m["path"] == modelfile.as_posix()}
    assert caught_by == {"manifest", "modelfiles"}   # the manifest's hash and the BOM's
    assert "! models/release/gguf-q4_k_m/Modelfile: manifest check" in out


def test_a_modelfile_pointing_elsewhere_is_caught_even_with_the_manifest_rewritten(released):
    """A FROM naming another GGUF (here the f16 file, copied in) fails verify even when the manifest is updated."""
    folder = RELEASE / "gguf-q4_k_m"
    shutil.copy(Path("models/gguf/model-f16.gguf"), folder / "model-f16.gguf")
    modelfile = folder / "Modelfile"
    modelfile.write_text(modelfile.read_text().replace("FROM ./model-q4_k_m.gguf", "FROM ./model-f16.gguf"))
    manifest = RELEASE / "MANIFEST.sha256"
    manifest.write_text("".join(f"{sha256_file(modelfile)}  {modelfile.as_posix()}\n" if line.endswith(
        modelfile.as_posix()) else line + "\n" for line in manifest.read_text().splitlines()))
    mismatches = [m for m in verify.verify()["mismatches"] if m["check"] == "modelfiles"]
    assert {(m["expected"], m["found"]) for m in mismatches if m["record"].endswith("FROM (the GGUF beside it)")} == {
        ("./model-q4_k_m.gguf", "./model-f16.gguf")}
    assert any(m["path"] == "models/release/gguf-q4_k_m/model-f16.gguf" for m in mismatches)   # not the q4_k_m file
    assert any(m["record"] == "models/release/sbom.cdx.json" for m in mismatches)   # nor the BOM's Modelfile


def test_a_missing_modelfile_is_caught(released):
    (RELEASE / "gguf-f16/Modelfile").unlink()
    found = {(m["check"], m["found"]) for m in verify.verify()["mismatches"]
             if m["path"] == "models/release/gguf-f16/Modelfile"}
    assert {("modelfiles", "no FROM"), ("modelfiles", "missing"), ("manifest", "missing")} <= found
