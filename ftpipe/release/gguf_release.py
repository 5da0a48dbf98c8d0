"""What the release says about each GGUF, in one place for the report, the model cards and the BOM: its Modelfile
(ftpipe/gguf/modelfile.py, with the release's license text), its tensor type mix, the llama.cpp build it was
checked in, the greedy comparison, and the commands that run it.

The quantize stage's record, as stages/report.py copies it into the report dict:

    report["evaluation"]["gguf"][type]        bytes, bits_per_weight, types (the tensor type mix), validation_loss,
                                              loss_gap, tokenizer_mismatches, chat_prompts_compared,
                                              chat_prompt_mismatches, stop_token_problems
    report["evaluation"]["gguf_greedy"]       the f16 GGUF's greedy answers in llama.cpp vs the merged model's
    report["evaluation"]["llama_cpp"]         the llama.cpp build every GGUF was checked in
    report["evaluation"]["end_of_turn_tokens"]
    an artifact of kind "gguf"                gguf_type, files (the GGUF), chat_template (the GGUF's own)

Every function is pure: the Modelfile written into the release, the one the BOM hashes and the one a card lists
are the same text.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import PurePosixPath
from typing import Any

from ftpipe.compliance.licenses import commercial_use_of
from ftpipe.core.gguf_types import GREEDY_CHECK_TYPE
from ftpipe.gguf.modelfile import MODELFILE, modelfile

GREEDY_FILE_TYPE = GREEDY_CHECK_TYPE   # the GGUF the quantize stage compares greedy answers on


# --- the Modelfile ----------------------------------------------------------------------------------------------

def gguf_file(artifact: dict[str, Any]) -> str:
    """The file name of a GGUF artifact's one file."""
    return PurePosixPath(artifact["files"][0]["path"]).name


def modelfile_path(artifact: dict[str, Any]) -> str:
    """Where the artifact's Modelfile is in the release (project-relative)."""
    return (PurePosixPath(artifact["release_folder"]) / MODELFILE).as_posix()


def release_modelfile(report: dict[str, Any], artifact: dict[str, Any]) -> str:
    """The Modelfile written beside the GGUF of `artifact` in its release folder."""
    stop_tokens = (report.get("evaluation") or {}).get("end_of_turn_tokens") or []
    return modelfile(gguf_file(artifact), stop_tokens, artifact.get("chat_template"), license_text(report))


def modelfile_facts(report: dict[str, Any], artifact: dict[str, Any]) -> dict[str, Any]:
    """{path, bytes, sha256} of the artifact's Modelfile, as the release writes it."""
    data = release_modelfile(report, artifact).encode("utf-8")
    return {"path": modelfile_path(artifact), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def license_text(report: dict[str, Any]) -> str:
    """The Modelfile's LICENSE: the concluded license expression first (what `ollama show --license` shows on top),
    then whether commercial use is allowed, and every obligation the compliance report lists."""
    # imported here: model_card imports this module
    from ftpipe.release.model_card import COPYLEFT_MEANINGS

    compliance, base = report["compliance"], report["base_model"]
    chosen = {(entry.get("role"), entry.get("name")): entry for entry in compliance.get("inputs") or []}
    lines = [str(compliance["concluded_license"]), "",
             f"This model is an adaptation of {base['id']} and of every data source below, so the obligations of "
             "all their licenses apply together.",
             f"Commercial use: {_commercial_use(compliance)}.",
             f"Intended use (license policy): {compliance['policy'].get('intended_use')}.", "",
             "Licenses of the inputs:"]
    lines.append(f"- base model {base['id']}: {base.get('license')}" + _url(base.get("license_url")))
    for source in report.get("data_sources") or []:
        entry = chosen.get(("data source", source["name"])) or {}
        concluded = f" (concluded {entry['chosen']})" if entry.get("chosen") not in (None, source.get("license")) \
            else ""
        lines.append(f"- data source {source['name']}: {source.get('license')}{concluded}"
                     + _url(source.get("license_url")))
    lines += _listed("Share-alike and copyleft obligations", [
        f"{entry['source']} ({entry['license']}, {entry.get('copyleft')}): "
        f"{COPYLEFT_MEANINGS.get(entry.get('copyleft'), 'see the license text')}"
        for entry in _dicts(compliance, "share_alike")])
    lines += _listed("Attribution notices to keep", [f"{entry['source']} ({entry['license']}): {entry.get('notice')}"
                                                     for entry in _dicts(compliance, "attribution")])
    lines += _listed("Licenses unknown to ftpipe (their terms were not checked)", [
        f"{entry.get('source')} ({entry.get('license')})" if isinstance(entry, dict) else str(entry)
        for entry in compliance.get("unknown_licenses") or []])
    lines += _listed("Notes", [str(note) for note in compliance.get("notes") or []])
    return "\n".join([*lines, "", "The model card (README.md) beside this file and the release's compliance report "
                      "(report.html) state the full terms."])


def _commercial_use(compliance: dict[str, Any]) -> str:
    status = commercial_use_of(compliance)
    if status == "allowed":
        return "allowed"
    blockers = [f"{entry['source']} ({entry['license']})" for entry in _dicts(compliance, "non_commercial_sources")]
    unknown = [f"{entry.get('source')} ({entry.get('license')})" if isinstance(entry, dict) else str(entry)
               for entry in compliance.get("unknown_licenses") or []]
    if status == "unknown":
        return f"not established (licenses unknown to ftpipe: {', '.join(unknown)})"
    return "not allowed" + (f", because of {', '.join(blockers + unknown)}" if blockers or unknown else "")


def _dicts(compliance: dict[str, Any], key: str) -> list[dict[str, Any]]:
    return [entry for entry in compliance.get(key) or [] if isinstance(entry, dict)]


def _url(url: str | None) -> str:
    return f" ({url})" if url else ""


def _listed(heading: str, items: list[str]) -> list[str]:
    return ["", f"{heading}:", *(f"- {item}" for item in items)] if items else []


# --- facts, as text -----------------------------------------------------------------------------------------------

def tensor_mix(types: dict[str, dict[str, int]] | None) -> str:
    """"Q5_0 166 tensors (58.1% of weights), Q8_0 15 (22.2%), ...": the types a GGUF really stores, largest share
    first (a Q4_K_M file keeps some tensors at higher precision and falls back to other types for rows that K-quant
    blocks do not divide)."""
    if not types:
        return "n/a"
    total = sum(entry.get("parameters", 0) for entry in types.values()) or 1
    parts = []
    for index, (name, entry) in enumerate(sorted(types.items(), key=lambda item: -item[1].get("parameters", 0))):
        share = entry.get("parameters", 0) / total
        shown = "<0.1%" if 0 < share < 0.001 else f"{share:.1%}"
        parts.append(f"{name} {entry.get('tensors', 0):,}{' tensors' if index == 0 else ''} "
                     f"({shown}{' of weights' if index == 0 else ''})")
    return ", ".join(parts)


def llama_cpp_build(info: dict[str, Any] | None) -> str:
    """"llama.cpp commit 0c1e57098 (llama-cpp-python 0.3.36), built with -DGGML_NATIVE=OFF (compiler ...)"."""
    if not info:
        return "llama.cpp (build not recorded)"
    text = f"llama.cpp commit {info.get('llama_cpp_commit') or 'unknown'}"
    text += f" (llama-cpp-python {info['package_version']})" if info.get("package_version") else ""
    text += f", built with {info['cmake_args']}" if info.get("cmake_args") else ", build flags not recorded"
    return text + (f" ({info['compiler']})" if info.get("compiler") else "")


def converter_text(converter: dict[str, Any] | None) -> str:
    """"llama.cpp convert_hf_to_gguf.py 0c1e57098 (gguf 0.19.0)": the converter that wrote the float and q8_0 GGUFs."""
    if not converter:
        return "n/a"
    text = f"{converter.get('package') or 'converter'} {converter.get('version') or '(version unknown)'}"
    return text + (f" (gguf {converter['gguf']})" if converter.get("gguf") else "")


def greedy_summary(greedy: dict[str, Any] | None) -> str:
    if not greedy:
        return "not compared"
    needed = f" ({greedy['needed']} needed)" if greedy.get("needed") is not None else ""
    return (f"the same text as the merged model on {greedy.get('same_text')} of {greedy.get('prompts')} validation "
            f"prompts{needed}; stopped at the end-of-turn token where the merged model stopped on "
            f"{greedy.get('stopped_where_merged_stopped')} of {greedy.get('merged_stopped')}")


def greedy_passed(greedy: dict[str, Any]) -> bool:
    enough = greedy.get("needed") is None or (greedy.get("same_text") or 0) >= greedy["needed"]
    return enough and greedy.get("stopped_where_merged_stopped") == greedy.get("merged_stopped")


def chat_prompts(entry: dict[str, Any]) -> str:
    compared, mismatches = entry.get("chat_prompts_compared"), entry.get("chat_prompt_mismatches")
    if compared is None or mismatches is None:
        return "n/a"
    return f"{mismatches:,} of {compared:,}"


def ollama_name(report: dict[str, Any], artifact: dict[str, Any]) -> str:
    """A model name for `ollama create`: lowercase letters, digits, '.', '-' and '_'."""
    base = str(report["base_model"]["id"]).rsplit("/", 1)[-1]
    return re.sub(r"[^a-z0-9._-]+", "-", f"{base}-ftpipe-{artifact.get('gguf_type')}".lower()).strip("-._")


def run_commands(report: dict[str, Any], artifact: dict[str, Any]) -> dict[str, list[str]]:
    """How to run a GGUF: with Ollama in its release folder, and with ftpipe from the project root."""
    gguf_type, name = artifact.get("gguf_type"), ollama_name(report, artifact)
    return {"ollama": [f"ollama create {name} -f {MODELFILE}", f"ollama run {name}"],
            "ftpipe": [f"python -m ftpipe.chat --model gguf:{gguf_type}", f"python -m ftpipe.serve --gguf {gguf_type}"]}
