"""Environment pins: the llama.cpp build is recorded with its vendored commit and flags, and only when the
build record belongs to the installed llama-cpp-python."""
import json

from ftpipe.core import provenance


def test_the_llama_cpp_build_is_in_every_environment_pin():
    env = provenance.environment()
    assert env["packages"]["llama-cpp-python"] == "0.3.36"
    assert env["llama_cpp"]["package_version"] == "0.3.36"
    assert env["llama_cpp"]["llama_cpp_commit"] == "0c1e57098"   # from the sdist's CHANGELOG
    assert env["llama_cpp"]["cmake_args"] == "-DGGML_NATIVE=OFF"


def test_a_build_record_of_another_version_is_not_this_installs(tmp_path, monkeypatch):
    record = tmp_path / "llama-cpp-build.json"
    record.write_text(json.dumps({"version": "0.3.1", "llama_cpp_commit": "abc1234", "cmake_args": "-DX=ON"}))
    monkeypatch.setattr(provenance, "LLAMA_CPP_BUILD_FILE", record)
    assert provenance.llama_cpp_build() == {"package_version": "0.3.36"}
    monkeypatch.setattr(provenance, "LLAMA_CPP_BUILD_FILE", tmp_path / "missing.json")
    assert provenance.llama_cpp_build() == {"package_version": "0.3.36"}
