"""llama.cpp as the runtime: a file it cannot load is named with llama.cpp's own message; a GGUF without a
chat template is refused; the build record names llama.cpp's version, commit and flags."""
import platform

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.gguf.runtime import GGUF_CHAT_FORMAT, build_info, open_gguf


def test_a_file_llama_cpp_cannot_load_is_named_with_llama_cpps_message(tmp_path):
    junk = tmp_path / "model-q4_k_m.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 60)   # the magic, then an impossible version
    with pytest.raises(PipelineError) as error:
        open_gguf(junk, 64)
    message = str(error.value)
    assert message.startswith(f"{junk}: llama.cpp cannot load this GGUF: ")
    # llama.cpp's own reason, not only llama-cpp-python's "Failed to load model from file"
    assert "this GGUF file is version 4294967295 but this software only supports up to version 3" in message
    with pytest.raises(PipelineError, match="no such GGUF file"):
        open_gguf(tmp_path / "missing.gguf", 64)


def test_the_ggufs_own_template_is_the_chat_format(tiny_gguf):
    llm = open_gguf(tiny_gguf, 128)
    assert llm.chat_format == GGUF_CHAT_FORMAT
    llm.close()


def test_a_gguf_without_a_chat_template_is_refused(tmp_path, tiny_gguf):
    import subprocess
    import sys
    from pathlib import Path

    target = tmp_path / "no-template.gguf"
    subprocess.run([str(Path(sys.executable).parent / "gguf-new-metadata"), str(tiny_gguf), str(target), "--force",
                    "--remove-metadata", "tokenizer.chat_template"], check=True, capture_output=True)
    with pytest.raises(PipelineError, match="no-template.gguf: this GGUF has no chat template"):
        open_gguf(target, 64)


def test_build_info_names_version_commit_flags_and_cpu_features():
    info = build_info()
    assert info["package_version"] == "0.3.36"
    assert info["cmake_args"] == "-DGGML_NATIVE=OFF" and len(info["llama_cpp_commit"]) >= 7
    # the portable x86-64 build: AVX2/FMA/F16C compiled in, whatever the build machine had
    assert "AVX2 = 1" in info["system_info"] or platform.machine() != "x86_64"
