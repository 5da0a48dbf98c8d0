"""tools/build_llama_cpp.py: the cache key follows the version, the flags and the Python; the vendored llama.cpp
commit is read from the sdist's CHANGELOG; a cached build is installed without building again."""
import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def builder():
    spec = importlib.util.spec_from_file_location("build_llama_cpp", REPO / "tools" / "build_llama_cpp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cache_key_changes_with_the_flags_and_the_version(builder, monkeypatch):
    key = builder.build_key()
    assert key.startswith("llama-cpp-python-0.3.36-")
    monkeypatch.setattr(builder, "CMAKE_ARGS", "-DGGML_NATIVE=ON")
    assert builder.build_key() != key
    monkeypatch.setattr(builder, "CMAKE_ARGS", "-DGGML_NATIVE=OFF")
    assert builder.build_key() == key
    monkeypatch.setattr(builder, "VERSION", "0.3.37")
    assert builder.build_key() != key


def test_the_vendored_commit_comes_from_this_versions_changelog_section(builder, tmp_path):
    changelog = ("# Changelog\n\n## [Unreleased]\n\n## [0.3.36]\n\n"
                 "- feat: update llama.cpp to ggml-org/llama.cpp@0c1e57098\n\n"
                 "## [0.3.35]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@4df29be4f\n").encode()
    sdist = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        member = tarfile.TarInfo("llama_cpp_python-0.3.36/CHANGELOG.md")
        member.size = len(changelog)
        archive.addfile(member, io.BytesIO(changelog))
    assert builder.llama_cpp_commit(sdist) == "0c1e57098"


def test_a_cached_build_is_installed_without_building(builder, tmp_path, monkeypatch):
    monkeypatch.setenv("FTPIPE_CACHE", str(tmp_path))
    target = tmp_path / "wheels" / builder.build_key()
    target.mkdir(parents=True)
    (target / builder.BUILD_INFO).write_text(json.dumps({"wheel": "x.whl", "llama_cpp_commit": "0c1e57098"}))
    calls = []
    monkeypatch.setattr(builder, "build", lambda where: calls.append(("build", where)))
    monkeypatch.setattr(builder, "pip", lambda *args, env=None: calls.append(args))
    monkeypatch.setattr(builder, "INSTALLED_INFO", tmp_path / "share" / "llama-cpp-build.json")
    builder.main()
    assert calls == [("install", "--quiet", "--no-deps", "--force-reinstall", str(target / "x.whl"))]
    assert json.loads((tmp_path / "share" / "llama-cpp-build.json").read_text())["llama_cpp_commit"] == "0c1e57098"
