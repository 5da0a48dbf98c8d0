"""Write a GGUF of the merged model: llama.cpp's converter for the float types and q8_0, llama.cpp's
quantizer (from the f16 GGUF) for K-quants. Sharded merged models (several safetensors files and an
index) convert as one model: the converter reads every part.

The converter is llama.cpp's own convert_hf_to_gguf.py from the llama.cpp commit the runtime is built from
(tools/build_llama_cpp.py installs it, with its gguf-py, into <prefix>/share/ftpipe/llama-cpp-converter/): a
converter of another snapshot can write what this runtime reads differently or not at all. Its failure is
reported as its own error message (the last lines of its traceback), not as its log."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ftpipe.core.errors import PipelineError
from ftpipe.core.gguf_types import GGUF_TYPES, K_QUANT_FTYPES, K_QUANT_SOURCE
from ftpipe.core.provenance import LLAMA_CPP_BUILD_FILE, LLAMA_CPP_CONVERTER_DIR
from ftpipe.gguf.runtime import llama_cpp

CONVERTER = "llama.cpp convert_hf_to_gguf.py"
CONVERTER_DIR = LLAMA_CPP_CONVERTER_DIR
CONVERTER_SCRIPT = CONVERTER_DIR / "convert_hf_to_gguf.py"
SETUP_HINT = "run `make setup` (tools/build_llama_cpp.py installs llama.cpp's converter with the runtime)"
# Conversions run side by side: two processes, each converting one tensor at a time (lazily), keep the memory of
# two tensors of the largest model, and use the two cores of the smallest machine this pipeline runs on
CONVERTER_PROCESSES = 2


def converter_command() -> list[str]:
    """This Python running llama.cpp's converter script (which puts its own gguf-py first on sys.path)."""
    if not CONVERTER_SCRIPT.is_file():
        raise PipelineError(f"llama.cpp's GGUF converter is not installed ({CONVERTER_SCRIPT} is missing): "
                            f"{SETUP_HINT}")
    return [sys.executable, str(CONVERTER_SCRIPT)]


def converter_info() -> dict[str, Any]:
    """What converts: llama.cpp's script, the llama.cpp commit it comes from, its gguf-py version and the SHA-256
    of its files (recorded by tools/build_llama_cpp.py); the keys the release reads: package, version, gguf."""
    built = json.loads(LLAMA_CPP_BUILD_FILE.read_text()) if LLAMA_CPP_BUILD_FILE.exists() else {}
    converter = built.get("converter") or {}
    commit = built.get("llama_cpp_commit")
    return {"package": CONVERTER, "version": commit,
            "gguf": converter.get("gguf_py_version"), "sha256": converter.get("sha256"),
            "path": str(CONVERTER_SCRIPT)}


def converter_error(stderr: str) -> str:
    """What the converter said went wrong: its exception (the traceback's last line and the frame that raised it)
    and its ERROR lines, without its INFO log."""
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    said = [line for line in lines if line.startswith("ERROR:")]
    traceback = "Traceback (most recent call last):"
    if traceback not in lines:
        return "\n".join(said or lines[-5:])
    tail = lines[len(lines) - 1 - lines[::-1].index(traceback) + 1:]   # the last traceback
    said.append(next((line for line in reversed(tail) if not line.startswith(" ")), tail[-1] if tail else traceback))
    frames = [line.strip().removeprefix("File ") for line in tail if line.startswith("  File ")]
    if frames:
        said.append(f"(raised at {frames[-1]})")
    return "\n".join(said)


def added_tokens_decoder(model_dir: Path) -> dict[str, dict] | None:
    """tokenizer_config.json's "added_tokens_decoder" as transformers 4 wrote it, rebuilt from tokenizer.json's
    added tokens, when the folder's tokenizer_config.json lacks it (transformers 5 no longer writes it); None when
    it has it or there is nothing to rebuild it from.

    llama.cpp's converter types a SentencePiece vocabulary's special tokens from that entry alone (Gemma, Mistral,
    Llama 2 style models): without it, Gemma's <start_of_turn> is written as a normal token, which llama.cpp then
    does not parse in a prompt, and every chat prompt is tokenized wrong."""
    config_path, tokenizer_path = model_dir / "tokenizer_config.json", model_dir / "tokenizer.json"
    if not (config_path.is_file() and tokenizer_path.is_file() and (model_dir / "tokenizer.model").is_file()):
        return None
    if "added_tokens_decoder" in json.loads(config_path.read_text(encoding="utf-8")):
        return None
    added = json.loads(tokenizer_path.read_text(encoding="utf-8")).get("added_tokens") or []
    return {str(token["id"]): {key: token.get(key, False) for key in ("content", "lstrip", "normalized", "rstrip",
                                                                   "single_word", "special")}
            for token in added} or None


def converter_view(merged_dir: Path, scratch: Path) -> Path:
    """The folder the converter reads: `merged_dir` itself, or, when its tokenizer_config.json lacks the added tokens
    the converter types special tokens from (added_tokens_decoder), a folder of links to its files in `scratch` with
    that entry added. The merged model's own files are never changed."""
    decoder = added_tokens_decoder(merged_dir)
    if decoder is None:
        return merged_dir
    scratch.mkdir(parents=True, exist_ok=True)
    for path in merged_dir.iterdir():
        if path.name != "tokenizer_config.json":
            (scratch / path.name).symlink_to(path.resolve())
    config = json.loads((merged_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    (scratch / "tokenizer_config.json").write_text(json.dumps({**config, "added_tokens_decoder": decoder}, indent=2,
                                                              ensure_ascii=False), encoding="utf-8")
    return scratch


def convert(merged_dir: Path, gguf_type: str, out_file: Path, vocab_only: bool = False) -> None:
    """The converter's GGUF of `merged_dir` in one of CONVERTER_TYPES; with `vocab_only`, its tokenizer and metadata
    alone (no tensors: seconds, for checking a base model's tokenizer before training)."""
    import tempfile

    env = {key: value for key, value in os.environ.items() if key != "NO_LOCAL_GGUF"}   # its own gguf-py, always
    with tempfile.TemporaryDirectory(prefix="ftpipe-convert-") as scratch:
        source = converter_view(Path(merged_dir), Path(scratch) / Path(merged_dir).name)
        done = subprocess.run([*converter_command(), str(source), "--outfile", str(out_file),
                               "--outtype", gguf_type, *(["--vocab-only"] if vocab_only else [])],
                              capture_output=True, text=True, env=env)
    if done.returncode != 0 or not out_file.exists():
        raise PipelineError(f"llama.cpp's GGUF converter cannot convert {merged_dir} to {gguf_type} (exit "
                            f"{done.returncode}): {converter_error(done.stderr)}")


def quantize(source: Path, gguf_type: str, out_file: Path) -> None:
    """llama.cpp's quantizer: `source` (a 16-bit GGUF) to the K-quant `gguf_type`."""
    module = llama_cpp()
    params = module.llama_model_quantize_default_params()
    params.ftype = K_QUANT_FTYPES[gguf_type]
    params.nthread = os.cpu_count() or 1
    status = module.llama_model_quantize(str(source).encode(), str(out_file).encode(), params)
    if status != 0 or not out_file.exists():
        raise PipelineError(f"llama.cpp's quantizer failed for {gguf_type} on {source} (status {status})")


def export_all(merged_dir: Path, types: list[str], out_dir: Path, scratch_f16: Path,
               always_f16: bool = False) -> dict[str, Path]:
    """Every requested type as out_dir/model-<type>.gguf, in order. K-quants are made from the f16 GGUF:
    the requested f16 file itself, or `scratch_f16` (the caller removes it) when f16 is not requested;
    `always_f16` writes that scratch file even with no K-quant (the quantize stage's greedy check runs on it)."""
    unknown = [gguf_type for gguf_type in types if gguf_type not in GGUF_TYPES]
    if unknown:
        raise PipelineError(f"quantize.types: {unknown} unknown; valid types are {list(GGUF_TYPES)}")
    files = {gguf_type: out_dir / f"model-{gguf_type}.gguf" for gguf_type in types}
    source = files.get(K_QUANT_SOURCE, scratch_f16)
    conversions = {gguf_type: out_file for gguf_type, out_file in files.items() if gguf_type not in K_QUANT_FTYPES}
    if always_f16 or any(gguf_type in K_QUANT_FTYPES for gguf_type in types):
        conversions[K_QUANT_SOURCE] = source
    convert_all(merged_dir, conversions)
    for gguf_type, out_file in files.items():
        if gguf_type in K_QUANT_FTYPES:
            quantize(source, gguf_type, out_file)
    return files


def convert_all(merged_dir: Path, conversions: dict[str, Path]) -> None:
    """The converter's GGUF of `merged_dir` in each type, CONVERTER_PROCESSES at a time: each conversion is one
    process that mostly imports torch and transformers and then converts one tensor at a time on one core (the
    f16 and q8_0 files of the default run are ready in the time of one). The first failure, in type order, is
    raised once all have ended."""
    from concurrent.futures import ThreadPoolExecutor

    if not conversions:
        return
    workers = max(1, min(len(conversions), CONVERTER_PROCESSES, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        running = [pool.submit(convert, merged_dir, gguf_type, out_file) for gguf_type, out_file in conversions.items()]
    for done in running:
        done.result()
    align_space_prefix(merged_dir, list(conversions.values()))


SPACE_PREFIX_KEY = "tokenizer.ggml.add_space_prefix"


def space_prefix_after_special(pieces: list[str]) -> bool:
    """Whether the text after a special token starts with SentencePiece's word-start mark (the pieces of the text
    that follows it, as strings)."""
    return "".join(pieces).startswith(("\u2581", " "))


def align_space_prefix(merged_dir: Path, files: list[Path]) -> None:
    """Make llama.cpp start the text after a special token as the merged model's tokenizer does, in each GGUF.

    For a SentencePiece vocabulary llama.cpp prefixes a space to every piece of text after a special token unless
    the GGUF says tokenizer.ggml.add_space_prefix = false (and Phi-3's converter never writes it). transformers 5
    builds a Llama-style SentencePiece tokenizer (Phi-3's, any converted from tokenizer.model) with the prefix only
    at the very start of a text, never after a special token: every chat prompt, which starts with one, would be
    tokenized differently in llama.cpp than in training. When the two disagree after a special token, the GGUF is
    rewritten with the merged tokenizer's rule (llama.cpp's gguf-py, metadata only; the tensors are copied as
    they are)."""
    from ftpipe.gguf.runtime import llama_cpp

    if not files:
        return
    module = llama_cpp()
    probe = module.Llama(model_path=str(files[0]), vocab_only=True, verbose=False)
    try:
        if probe.metadata.get("tokenizer.ggml.model") != "llama":   # not SentencePiece: no such rule
            return
        from ftpipe.model.modeling import load_tokenizer

        tokenizer = load_tokenizer(merged_dir)
        special = next((token for token in (tokenizer.eos_token, tokenizer.bos_token, *tokenizer.all_special_tokens)
                        if token), None)
        if special is None:
            return
        text = f"{special}a"
        ours = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])[1:]
        vocab = module.llama_model_get_vocab(probe.model)   # the pieces as stored ("\u2581a"), not detokenized
        theirs = [module.llama_vocab_get_text(vocab, token).decode("utf-8", "replace")
                  for token in probe.tokenize(text.encode(), add_bos=False, special=True)[1:]]
    finally:
        probe.close()
    wanted = space_prefix_after_special(ours)
    if space_prefix_after_special(theirs) == wanted:
        return
    for path in files:
        set_bool_metadata(path, SPACE_PREFIX_KEY, wanted)


def set_bool_metadata(path: Path, key: str, value: bool) -> None:
    """Rewrite the GGUF at `path` with the boolean metadata `key` set (llama.cpp's gguf-py, the converter's own)."""
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(CONVERTER_DIR / 'gguf-py')!r})\n"
        "import gguf\n"
        "from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata\n"
        "source, target, key, value = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == 'true'\n"
        "reader = gguf.GGUFReader(source)\n"
        "arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()\n"
        "writer = gguf.GGUFWriter(target, arch=arch, endianess=reader.endianess)\n"
        "copy_with_new_metadata(reader, writer, {key: MetadataDetails(gguf.GGUFValueType.BOOL, value)}, [])\n")
    staged = path.with_name(path.name + ".metadata.tmp")
    done = subprocess.run([sys.executable, "-c", script, str(path), str(staged), key, str(value).lower()],
                          capture_output=True, text=True)
    if done.returncode != 0 or not staged.exists():
        staged.unlink(missing_ok=True)
        raise PipelineError(f"{path}: could not set {key} = {value} in the GGUF: {converter_error(done.stderr)}")
    staged.replace(path)
