"""Model cards: the README.md (Hugging Face card: YAML front matter, then Markdown) of each released artifact.

stages/report.py writes one into every release folder (adapter/, merged/, gguf-<type>/), built from the
compliance report's dict (tests/fixtures/report_example.json shows its shape):

    (folder / CARD_FILE).write_text(model_card(report, "merged"))

Why our own card: peer tools write `license: apache-2.0` (or a placeholder) whatever the model was trained
on, but a fine-tuned model carries the obligations of its base model and of every data source. This card
states the license the gate concluded (ftpipe.compliance.licenses), whether commercial use is allowed, not allowed or
not established (a license unknown to ftpipe) and why, the licenses a reviewer declared, and the duties that travel
with the model; then the data, the scores, the files and how to check them. A GGUF's card also states what the
quantize stage checked of it in llama.cpp (size, bits per weight, tensor type mix, loss, tokenizer, chat
template, stop token, greedy answers), the llama.cpp build, and how to run it (Ollama with its Modelfile,
ftpipe's chat and server). The evaluation states the evaluate stage's gate verdict, the task metrics per data
source and the general-text loss change; its "Memorization audit" the extraction gap per source, PII values in
answers and, when the model was trained with canaries, that it was (their numbers, never their secrets). Declared
names, creators and notes are untrusted text: the front matter is yaml.safe_dump's and Markdown text is
flattened and escaped, so no declaration can change the card's structure.
"""
from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

import yaml

from ftpipe.compliance.license_table import HF_LICENSE_IDS
from ftpipe.compliance.licenses import commercial_use_of
from ftpipe.core.errors import PipelineError
from ftpipe.release.gguf_release import (
    GREEDY_FILE_TYPE,
    MODELFILE,
    chat_prompts,
    gguf_file,
    greedy_passed,
    greedy_summary,
    llama_cpp_build,
    modelfile_facts,
    run_commands,
    tensor_mix,
)

CARD_FILE = "README.md"

# SPDX id -> Hugging Face id: the Hub filters and displays only its own ids in `license`.
HF_ID_BY_SPDX = {spdx_id: hf_id for hf_id, spdx_id in HF_LICENSE_IDS.items()}
# Artifact kind -> (the Hub's base_model_relation, library_name, what the card calls it).
KINDS = {"merged-model": ("finetune", "transformers", "merged model"),
         "lora-adapter": ("adapter", "peft", "LoRA adapter"),
         "gguf": ("quantized", "gguf", "GGUF file")}
COPYLEFT_MEANINGS = {
    "share-alike": "the model and any adaptation of it must be shared under the same or a compatible license",
    "copyleft": "the model and works that include it must be shared under the same license, with their source",
    "network-copyleft": "as copyleft, and also when people use the model over a network",
    "weak-copyleft": "changes to the licensed material must be shared under the same license",
    "pass-through-terms": "its use terms must be passed on to everyone who receives the model or an adaptation",
}
INTENDED_USE_MEANINGS = {"commercial": "commercial use", "research": "non-commercial research",
                         "internal": "internal non-commercial use: evaluation, research and development"}
# (key in evaluation.base/tuned, label, decimal places)
TEST_METRICS = [("loss", "Loss", 4), ("perplexity", "Perplexity", 2), ("rougeL", "ROUGE-L", 3), ("chrF", "chrF", 3),
                ("exact_match", "Exact match", 3), ("token_f1", "Token F1", 3),
                ("mean_answer_words", "Mean answer words", 1)]
TASK_METRICS = [("rougeL", "ROUGE-L"), ("chrF", "chrF"), ("exact_match", "Exact match"), ("token_f1", "Token F1")]


def model_card(report: dict[str, Any], artifact_name: str) -> str:
    """The README.md text of the artifact `artifact_name` (an entry of report["artifacts"])."""
    by_name = {artifact["name"]: artifact for artifact in report["artifacts"]}
    if artifact_name not in by_name:
        raise PipelineError(f"no artifact {artifact_name!r} in the report: valid names are "
                            f"{', '.join(sorted(by_name)) or '(none)'}")
    artifact = by_name[artifact_name]   # its kind is one of KINDS: stages/report.py writes no other
    sections = [_summary(report, artifact), _license(report), _base_model(report), _training_data(report),
                _intended_use(report), _evaluation(report, artifact)]
    if artifact["kind"] == "gguf":
        sections.append(_how_to_run(report, artifact))
    sections += [_files(report, artifact), _provenance(report)]
    return _front_matter(report, artifact) + "\n\n".join("\n".join(lines) for lines in sections) + "\n"


# --- escaping: user-declared text must not change the card's structure ---------------------------------

def _inline(value: Any) -> str:
    """Text on one line: a newline could start a heading or a table row, and `<` raw HTML."""
    if value is None or value == "" or value == []:
        return "n/a"
    if isinstance(value, (list, tuple)):
        return ", ".join(_inline(item) for item in value)
    return " ".join(str(value).split()).replace("<", "&lt;")


def _cell(value: Any) -> str:
    """A table cell: an unescaped pipe would split it."""
    return _inline(value).replace("\\", "\\\\").replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows])


def _bullets(heading: str, items: list[str], when_empty: str) -> list[str]:
    return ["", f"### {heading}", ""] + [f"- {item}" for item in items or [when_empty]]


def _number(value: float | None, places: int, signed: bool = False) -> str:
    return "n/a" if value is None else f"{value:{'+' if signed else ''}.{places}f}"


def _size(size: int) -> str:
    power = min((size.bit_length() - 1) // 10, 4) if size > 0 else 0   # 1024**power <= size
    return f"{size} B" if power == 0 else f"{size / 1024 ** power:.1f} {'BKMGT'[power]}iB ({size:,} bytes)"


def _slug(expression: str) -> str:
    """The Hub's license_name allows only lowercase letters, digits, '-' and '.'."""
    return re.sub(r"[^a-z0-9.]+", "-", expression.lower()).strip("-.") or "unknown"


# --- sections ----------------------------------------------------------------------------------------

def _front_matter(report: dict[str, Any], artifact: dict[str, Any]) -> str:
    compliance = report["compliance"]
    concluded = compliance["concluded_license"]
    relation, library, _ = KINDS[artifact["kind"]]
    # An expression ("A AND B") is never a key, so only a single id with a Hub id gets one.
    hf_id = HF_ID_BY_SPDX.get(concluded)
    meta: dict[str, Any] = ({"license": hf_id} if hf_id else
                            {"license": "other", "license_name": _slug(concluded), "license_link": "#license"})
    tags = ["ftpipe", "qlora", "lora"]
    if artifact["kind"] == "gguf":
        tags += ["gguf", str(artifact.get("gguf_type"))]
    commercial = commercial_use_of(compliance)
    if commercial != "allowed":
        tags.append("non-commercial" if commercial == "not allowed" else "commercial-use-unknown")
    meta.update(base_model=report["base_model"]["id"], base_model_relation=relation, library_name=library,
                pipeline_tag="text-generation", tags=tags)
    # width: no folding, so a long value stays on one line; safe_dump quotes and escapes everything else.
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=10**9) + "---\n\n"


def _artifact_title(artifact: dict[str, Any]) -> str:
    title = KINDS[artifact["kind"]][2]
    detail = artifact.get("gguf_type") or artifact.get("dtype")
    return f"{title} ({_inline(detail)})" if detail else title


def _summary(report: dict[str, Any], artifact: dict[str, Any]) -> list[str]:
    sources = [_inline(source["name"]) for source in report["data_sources"]]
    project = report["project"]
    dirty = " (with uncommitted changes)" if project.get("git_dirty") else ""
    return [f"# {_inline(report['title'])}: {_artifact_title(artifact)}", "",
            f"This is the {_artifact_title(artifact)} `{_inline(artifact['name'])}` of a model fine-tuned with "
            f"QLoRA from the base model {_inline(report['base_model']['id'])} on {len(sources)} data "
            f"source{'s' if len(sources) != 1 else ''} ({', '.join(sources) or 'none'}), built by the ftpipe "
            f"pipeline at git commit `{_inline(project.get('git_commit'))}`{dirty}. Its license is concluded from "
            f"every input: see [License](#license)."]


def _commercial_use_text(compliance: dict[str, Any]) -> str:
    """The License section's sentence on commercial use: it must agree with the verdict beside it."""
    commercial, reviewed = commercial_use_of(compliance), compliance.get("reviewed_licenses") or []
    unknown = [f"{_inline(entry['source'])} ({_inline(entry['license'])})" for entry in compliance["unknown_licenses"]]
    if commercial == "allowed":
        by_review = (f"; {_inline([entry['id'] for entry in reviewed])}: as declared by a reviewer, see "
                     f"[Reviewed licenses](#reviewed-licenses)" if reviewed else "")
        return f"**Commercial use: allowed** (every input's license allows it{by_review})."
    if commercial == "unknown":
        flagged = (" The license gate passed only because `compliance.unknown_blocks` is false: it flags an unknown "
                   "license instead of failing on it." if not compliance["policy"]["unknown_blocks"] else "")
        return (f"**Commercial use: not established.** No input's license forbids it, but these licenses are unknown "
                f"to ftpipe, so their terms were not checked: {'; '.join(unknown)}.{flagged} To establish it, a "
                f"reviewer reads each license's text and declares it under `compliance.reviewed_licenses` in "
                f"params.yaml (its properties, URL and reviewer), and the pipeline is run again.")
    reasons = [f"{_inline(entry['source'])} ({_inline(entry['license'])}, non-commercial)"
               for entry in compliance["non_commercial_sources"]]
    reasons += [f"{_inline(entry['source'])} ({_inline(entry['license'])}: unknown, so commercial use "
                f"cannot be confirmed)" for entry in compliance["unknown_licenses"]]
    return f"**Commercial use: not allowed**, because of: {'; '.join(reasons) or 'n/a'}."


def _license(report: dict[str, Any]) -> list[str]:
    compliance, base = report["compliance"], report["base_model"]
    policy = compliance["policy"]
    commercial = _commercial_use_text(compliance)
    unknown_count = len(compliance["unknown_licenses"])
    flagged = (f", with {unknown_count} unknown license{'s' if unknown_count != 1 else ''} flagged, not checked "
               f"(`compliance.unknown_blocks` is false)" if unknown_count and not policy["unknown_blocks"] else "")
    use = policy["intended_use"]
    base_prefix = f"base model {base['id']!r}:"   # how ftpipe.compliance.licenses prefixes a note about the base model
    base_terms = [f"{_inline(base['id'])}: {_inline(base['license'])} ({_inline(base.get('license_url'))})"]
    base_terms += [_inline(note) for note in compliance["notes"] if note.startswith(base_prefix)]
    lines = ["## License", "", f"Concluded license: **{_inline(compliance['concluded_license'])}** (the model is "
             "an adaptation of every input below, so all their obligations apply together).", "", commercial, "",
             f"Intended use (license policy): **{_inline(use)}** ({INTENDED_USE_MEANINGS.get(use, 'n/a')}). "
             f"License gate verdict: {_inline(compliance['verdict'])}{flagged}."]
    if compliance["unknown_licenses"]:
        lines += _bullets("Unknown licenses", [
            f"**Warning:** {_inline(entry['source'])}: {_inline(entry['license'])} ({_inline(entry.get('reason'))}); "
            "its obligations were NOT checked: a person must read its terms before the model is shared or used, "
            "and declare it under `compliance.reviewed_licenses`"
            for entry in compliance["unknown_licenses"]], "")
    if compliance.get("reviewed_licenses"):
        lines += _bullets("Reviewed licenses", [
            f"{_inline(entry['id'])} ({_inline(entry['name'])}, {_inline(entry['url'])}), used by "
            f"{_inline(entry['used_by'])}: reviewed by {_inline(entry['reviewed_by'])}; commercial use "
            f"{'allowed' if entry['properties']['commercial_use'] else 'not allowed'}, copyleft "
            f"{_inline(entry['properties']['copyleft'])}, derivatives "
            f"{'forbidden' if entry['properties']['no_derivatives'] else 'allowed'}. Its properties are the "
            "reviewer's, declared in params.yaml `compliance.reviewed_licenses`, not ftpipe's license table"
            for entry in compliance["reviewed_licenses"]], "")
    lines += _bullets("Share-alike and copyleft obligations", [
        f"{_inline(entry['source'])} ({_inline(entry['license'])}, {_inline(entry['copyleft'])}): "
        f"{COPYLEFT_MEANINGS.get(entry['copyleft'], 'see the license text')}"
        for entry in compliance["share_alike"]], "none: no input's license propagates to the model")
    lines += _bullets("Attribution notices to keep", [
        f"{_inline(entry['source'])} ({_inline(entry['license'])}): {_inline(entry['notice'])}"
        for entry in compliance["attribution"]], "none required")
    lines += _bullets("Base model terms carried through", base_terms, "")
    lines += _bullets("Notes", [_inline(note) for note in compliance["notes"]], "none")
    return lines


def _base_model(report: dict[str, Any]) -> list[str]:
    base = report["base_model"]
    return ["## Base model", ""] + _table(["Field", "Value"], [
        ["Id", base["id"]], ["Revision", base.get("revision")],
        ["License", f"{_inline(base.get('license'))} ({_inline(base.get('license_url'))})"],
        ["Origin", base.get("origin")], ["Creators", base.get("creators")],
        ["Personal data", _personal_data(base)],
        ["Parameters", f"{base['parameters']:,}" if base.get("parameters") else None], ["Digest", base.get("digest")]])


def _personal_data(entry: dict[str, Any]) -> str:
    text = (f"yes; legal basis: {_inline(entry.get('personal_data_legal_basis'))}" if entry.get("personal_data")
            else "none declared")
    pii = entry.get("pii") or {}
    found = ", ".join(f"{_inline(kind)} {count}" for kind, count in (pii.get("found") or {}).items())
    if found:
        return f"{text}; PII scan found {found} in {pii.get('rows')} rows, action: {_inline(pii.get('action'))}"
    return f"{text}; PII scan found nothing" if pii else text


def _training_data(report: dict[str, Any]) -> list[str]:
    chosen = {entry["name"]: entry["chosen"] for entry in report["compliance"]["inputs"]
              if entry["role"] == "data source"}
    splits = report.get("splits") or {}
    lines = ["## Training data", "", "Rows kept after cleaning, by split: "
             + (", ".join(f"{_inline(split)} {count}" for split, count in splits.items()) or "n/a") + "."]
    for source in report["data_sources"]:
        generated = f"yes, by {_inline(source.get('generated_by'))}" if source.get("model_generated") else "no"
        lines += ["", f"### {_inline(source['name'])}", ""] + _table(["Field", "Value"], [
            ["License", f"declared {_inline(source.get('license'))}, concluded "
                        f"{_inline(chosen.get(source['name']))} ({_inline(source.get('license_url'))})"],
            ["Origin", source.get("origin")], ["Creators", source.get("creators")],
            ["Rows used", f"{source.get('rows_kept')} of {source.get('rows_in')}"],
            ["Model-generated", generated], ["Personal data", _personal_data(source)],
            ["SHA-256 (as ingested)", source.get("sha256")]])
    return lines


def _intended_use(report: dict[str, Any]) -> list[str]:
    use = report["compliance"]["policy"]["intended_use"]
    notes = [f"- {_inline(item.get('id') or item.get('name'))}: {_inline(item['intended_use_notes'])}"
             for item in [report["base_model"], *report["data_sources"]] if item.get("intended_use_notes")]
    return ["## Intended use", "", f"Declared intended use: **{_inline(use)}** "
            f"({INTENDED_USE_MEANINGS.get(use, 'n/a')}). What the creators of the base model and of the data say:",
            "", *(notes or ["- nothing declared"])]


def _evaluation(report: dict[str, Any], artifact: dict[str, Any]) -> list[str]:
    evaluation = report["evaluation"]
    base, tuned = evaluation.get("base") or {}, evaluation.get("tuned") or {}
    lines = ["## Evaluation", "", f"Held-out test split, {evaluation.get('test_examples', 'n/a')} examples "
             "(base: the base model; tuned: the base model with the fine-tuned adapter).", ""]
    lines += _table(["Metric", "Base", "Tuned"], [[label, _number(base.get(key), places),
                                                  _number(tuned.get(key), places)]
                                                 for key, label, places in TEST_METRICS
                                                 if base.get(key) is not None or tuned.get(key) is not None])
    lines += _gate_and_general_text(evaluation)
    merged_loss = evaluation.get("merged_validation_loss")
    if artifact["kind"] == "merged-model":
        lines += ["", f"Merged model: validation loss {_number(merged_loss, 4)}; merge gap vs the adapter "
                  f"on the same 16-bit base {_number(evaluation.get('merge_gap_vs_adapter'), 6, signed=True)}."]
    lines += _per_source(evaluation.get("task"))
    lines += _memorization(report.get("audit"))
    if artifact["kind"] == "gguf":
        lines += _gguf_evaluation(evaluation, artifact)
    return lines


def _gate_and_general_text(evaluation: dict[str, Any]) -> list[str]:
    """The evaluate stage's gate verdict and the loss change on general text (newer reports)."""
    lines = []
    gate = evaluation.get("gate")
    if gate:
        checks = gate.get("checks") or []
        missed = [check for check in checks if not check.get("passed")]
        if missed or not gate.get("passed"):
            verdict = (f"**FAILED**: {len(missed)} of {len(checks)} checks of `evaluate.gate` missed ("
                       + "; ".join(_gate_check(check) for check in missed) + ")")
        elif checks:
            verdict = (f"**passed**: all {len(checks)} checks of `evaluate.gate` met ("
                       + "; ".join(_gate_check(check) for check in checks) + ")")
        else:
            verdict = "no checks (every threshold of `evaluate.gate` is null)"
        lines += ["", f"Release gate: {verdict}."]
    general = evaluation.get("general_text")
    if general:
        text = general.get("set") or {}
        lines += ["", f"General ability: loss on general text that is not training data "
                  f"({_inline(text.get('origin'))}, license {_inline(text.get('license'))}, "
                  f"{_inline(text.get('passages'))} passages): base "
                  f"{_number((general.get('base') or {}).get('loss'), 4)}, tuned "
                  f"{_number((general.get('tuned') or {}).get('loss'), 4)} (change "
                  f"{_number(general.get('loss_increase'), 4, signed=True)}; higher means the tuned model lost some "
                  "general ability)."]
    drift = evaluation.get("drift")
    if drift and drift.get("rows"):
        regressed = [row["metric"] for row in drift["rows"] if row.get("regressed")]
        compared = [row["metric"] for row in drift["rows"]]
        lines += ["", "Against the last release: " + (f"regressed on {_inline(regressed)}" if regressed
                                                       else f"no regression on {_inline(compared)}") + "."]
    return lines


def _gate_check(check: dict[str, Any]) -> str:
    relation = ">=" if check.get("bound") == "min" else "<="
    return f"{_inline(check.get('metric'))} {check['value']:.4g} {relation} {check['threshold']:g}"


def _per_source(task: dict[str, Any] | None) -> list[str]:
    if not task or not task.get("per_source"):
        return []

    def cell(summary: dict[str, Any], key: str) -> str:
        base, tuned = (summary.get("base") or {}).get(key), (summary.get("tuned") or {}).get(key)
        return f"{_number(base, 3)} → {_number(tuned, 3)}"

    rows = [[name, summary.get("examples"), *(cell(summary, key) for key, _ in TASK_METRICS)]
            for name, summary in (("all sources", task.get("overall") or {}), *task["per_source"].items())]
    return ["", "### Task metrics per data source", "", "Base → tuned, the mean score of the greedy answers against "
            "the references (0 to 1):", ""] + _table(["Source", "Examples", *(label for _, label in TASK_METRICS)],
                                                     rows)


def _memorization(audit: dict[str, Any] | None) -> list[str]:
    """The audit stage's findings: what the tuned model repeats of its training data, PII, canaries."""
    if not audit:
        return []
    extraction = audit.get("extraction") or {}
    gaps = []
    for name, entry in (extraction.get("per_source") or {}).items():
        train = (entry.get("tuned_train") or {}).get("prefix_fraction")
        test = (entry.get("tuned_test") or {}).get("prefix_fraction")
        personal = ", declared personal data" if entry.get("personal_data") else ""
        gaps.append(f"{_inline(name)} {_number(entry.get('gap'), 3, signed=True)} (train {_number(train, 3)}, "
                    f"test {_number(test, 3)}{personal})")
    pii = audit.get("pii") or {}
    leaks = pii.get("leaks")
    kinds = ", ".join(f"{_inline(kind)} {count}" for kind, count in (pii.get("by_kind") or {}).items())
    gate = audit.get("gate") or {}
    lines = ["", "### Memorization audit", "",
             "Training prompts answered greedily by the tuned model: the share of the training answer it repeats "
             "word for word from its start, minus the same share on held-out test prompts (the extraction gap, "
             f"per data source): {'; '.join(gaps) or 'n/a'}. PII: {_inline(leaks)} real-looking personal data "
             f"values in {_inline(pii.get('prompts'))} answers{f' ({kinds})' if kinds else ''}. Audit gate: "
             f"{'passed' if gate.get('passed') else 'FAILED'} ({len(gate.get('checks') or [])} checks of "
             "`audit.gate`)."]
    canaries = audit.get("canaries")
    if canaries:
        results = canaries.get("results") or []
        shown = "; ".join(f"{_inline(result.get('id'))} planted {_inline(result.get('repeats'))}x: exposure "
                          f"{_number(result.get('exposure'), 2)} bits, "
                          f"{'extracted' if result.get('extracted') else 'not extracted'} by greedy decoding"
                          for result in results)
        lines += ["", f"**This model was trained with {_inline(canaries.get('count'))} canaries**: random secrets "
                  f"planted in its training data (repeated {_inline(canaries.get('repeats'))} times) to measure "
                  f"what it memorizes. Each is ranked among {_inline(canaries.get('candidates'))} random secrets of "
                  f"the same shape: {shown or 'n/a'}. The secrets are not published."]
    else:
        lines += ["", "No canaries were planted in the training data."]
    return lines


def _gguf_evaluation(evaluation: dict[str, Any], artifact: dict[str, Any]) -> list[str]:
    """What the quantize stage checked of this GGUF in llama.cpp, the runtime that serves it."""
    gguf_type = artifact.get("gguf_type")
    gguf = (evaluation.get("gguf") or {}).get(gguf_type)
    if gguf is None:
        return ["", "This GGUF file was not evaluated."]
    size = _size(gguf["bytes"]) if gguf.get("bytes") is not None else "n/a"
    bits = _number(gguf.get("bits_per_weight"), 3)
    lines = ["", f"### This GGUF file ({_inline(gguf_type)}) in llama.cpp", "",
             f"Size {size}, {bits} bits per weight. Tensor types stored: {_inline(tensor_mix(gguf.get('types')))}.",
             "", f"Checked against the merged model on the validation split in "
             f"{_inline(llama_cpp_build(evaluation.get('llama_cpp')))}, the runtime that serves it:", ""]
    mismatches = gguf.get("tokenizer_mismatches")
    check = "n/a" if mismatches is None else (
        "passed (0 mismatches)" if mismatches == 0 else f"FAILED ({mismatches} mismatches)")
    prompt_mismatches = gguf.get("chat_prompt_mismatches")
    prompts = "n/a" if prompt_mismatches is None else (
        f"{'passed' if prompt_mismatches == 0 else 'FAILED'}: {chat_prompts(gguf)} validation prompts differ from "
        "the prompts the model was trained on")
    problems = gguf.get("stop_token_problems")
    tokens = _inline(evaluation.get("end_of_turn_tokens"))
    stop = ("n/a" if problems is None else f"passed: llama.cpp ends generation at {tokens}" if not problems
            else "FAILED: " + "; ".join(_inline(problem) for problem in problems))
    greedy = evaluation.get("gguf_greedy")
    greedy_text = ("not compared" if not greedy else
                   f"{'passed' if greedy_passed(greedy) else 'FAILED'}: {greedy_summary(greedy)}"
                   + ("" if gguf_type == GREEDY_FILE_TYPE else
                      f" (compared once for all types, on the {GREEDY_FILE_TYPE} GGUF)"))
    lines += [f"- validation loss {_number(gguf.get('validation_loss'), 4)}; gap vs the merged model "
              f"{_number(gguf.get('loss_gap'), 6, signed=True)} (merged: "
              f"{_number(evaluation.get('merged_validation_loss'), 4)});",
              f"- tokenizer check against the Hugging Face tokenizer: {check};",
              f"- chat template (the GGUF's own, applied by llama.cpp): {prompts};",
              f"- stop token: {stop};",
              f"- greedy answers: {_inline(greedy_text)}."]
    return lines


def _how_to_run(report: dict[str, Any], artifact: dict[str, Any]) -> list[str]:
    """A GGUF card only: Ollama with the Modelfile beside it, and ftpipe's chat and server."""
    commands = run_commands(report, artifact)
    build = _inline(llama_cpp_build((report.get("evaluation") or {}).get("llama_cpp")))
    return ["## How to run", "", f"With [Ollama](https://ollama.com), in this folder: the `{MODELFILE}` beside the "
            f"GGUF names it (`FROM ./{_inline(gguf_file(artifact))}`), its stop token, its license and, for a ChatML "
            "chat template, the same prompt template as a Go TEMPLATE.", "", "```sh", *commands["ollama"], "```", "",
            "With ftpipe, from the project root (llama.cpp, as in the checks above): a chat in the terminal, or a "
            "local server.", "", "```sh", *commands["ftpipe"], "```", "",
            f"It was checked with {build}; other llama.cpp builds (Ollama's own included) may round differently."]


def _files(report: dict[str, Any], artifact: dict[str, Any]) -> list[str]:
    # The release folder holds each file under its own name (stages/report.py links them in flat).
    names = [(PurePosixPath(file["path"]).name, file) for file in artifact["files"]]
    if artifact["kind"] == "gguf":   # the Modelfile is written from the report: its hash is known here
        names.append((MODELFILE, modelfile_facts(report, artifact)))
    verify = (report.get("release") or {}).get("verify_command") or "python -m ftpipe.release.verify"
    return (["## Files", ""] + _table(["File", "Size", "SHA-256"], [[name, _size(file["bytes"]), file["sha256"]]
                                                                    for name, file in names])
            + ["", "Check them in this folder:", "", "```sh", "sha256sum -c <<'EOF'"]
            + [f"{file['sha256']}  {name}" for name, file in names]
            + ["EOF", "```", "", f"From the project root, `{_inline(verify)}` checks the whole release against "
               "MANIFEST.sha256, dvc.lock and the stages' own records."])


def _provenance(report: dict[str, Any]) -> list[str]:
    project, mlflow = report["project"], report.get("mlflow") or {}
    training = report.get("training") or {}
    environment = training.get("environment") or {}
    packages = ", ".join(f"{name} {_inline((environment.get('packages') or {}).get(name))}"
                         for name in ("torch", "transformers", "peft", "bitsandbytes"))
    device = f"CUDA {_inline(environment['torch_cuda'])}" if environment.get("torch_cuda") else "CPU"
    mlflow_text = (f"pipeline run `{_inline(mlflow['pipeline_run_id'])}` ({_inline(mlflow.get('ui_url'))}; open the "
                   f"UI with `{_inline(mlflow.get('ui_command'))}`)" if mlflow.get("pipeline_run_id")
                   else "not logged to MLflow")
    dirty = " (the working tree had uncommitted changes)" if project.get("git_dirty") else ""
    return ["## Provenance", "", f"- Git commit: `{_inline(project.get('git_commit'))}`{dirty}",
            f"- params.yaml SHA-256: `{_inline(project.get('params_sha256'))}`",
            f"- dvc.lock SHA-256: `{_inline(project.get('dvc_lock_sha256'))}`", f"- MLflow: {mlflow_text}",
            f"- Training environment: Python {_inline(environment.get('python'))}, {packages}; {device} "
            f"(backend: {_inline((training.get('metrics') or {}).get('backend'))})",
            "- The full compliance report (report.html, report.md, report.json) and the CycloneDX bill of materials "
            f"(sbom.cdx.json) are in the release folder, {_inline((report.get('release') or {}).get('folder'))}."]
