"""tools/build_llama_cpp.py: the cache key follows the version, the flags and the Python; the vendored llama.cpp
commit is read from the sdist's CHANGELOG; a cached build is installed without building again; llama.cpp's GGUF
converter of the same commit is taken from the sdist, kept with the wheel and installed next to it."""
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


def sdist_with(tmp_path: Path, files: dict[str, str]) -> Path:
    sdist = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        for name, text in files.items():
            member = tarfile.TarInfo(f"llama_cpp_python-0.3.36/{name}")
            member.size = len(text.encode())
            archive.addfile(member, io.BytesIO(text.encode()))
    return sdist


VENDORED = {"vendor/llama.cpp/convert_hf_to_gguf.py": "import gguf\n",
            "vendor/llama.cpp/conversion/__init__.py": "TEXT_MODEL_MAP = {}\n",
            "vendor/llama.cpp/conversion/llama.py": "# LlamaModel\n",
            "vendor/llama.cpp/gguf-py/gguf/__init__.py": "",
            "vendor/llama.cpp/gguf-py/pyproject.toml": '[project]\nname = "gguf"\nversion = "0.19.0"\n',
            "vendor/llama.cpp/gguf-py/tests/test_x.py": "",
            "vendor/llama.cpp/src/llama.cpp": "int main;\n",
            "vendor/llama.cpp/convert_lora_to_gguf.py": "",
            "llama_cpp/__init__.py": ""}


def test_the_converter_is_extracted_from_the_sdist_with_its_gguf_py(builder, tmp_path):
    converter = builder.extract_converter(sdist_with(tmp_path, VENDORED), tmp_path / "converter")
    files = sorted(p.relative_to(tmp_path / "converter").as_posix() for p in (tmp_path / "converter").rglob("*")
                   if p.is_file())
    assert files == ["conversion/__init__.py", "conversion/llama.py", "convert_hf_to_gguf.py",
                     "gguf-py/gguf/__init__.py", "gguf-py/pyproject.toml"]
    assert converter == {"script": "convert_hf_to_gguf.py", "gguf_py_version": "0.19.0",
                         "sha256": builder.tree_sha256(tmp_path / "converter")}


def cached_build(builder, tmp_path, monkeypatch, with_converter: bool) -> tuple[Path, list]:
    monkeypatch.setenv("FTPIPE_CACHE", str(tmp_path))
    target = tmp_path / "wheels" / builder.build_key()
    target.mkdir(parents=True)
    info = {"wheel": "x.whl", "llama_cpp_commit": "0c1e57098"}
    if with_converter:
        info["converter"] = builder.extract_converter(sdist_with(tmp_path, VENDORED), target / "converter")
    (target / builder.BUILD_INFO).write_text(json.dumps(info))
    calls = []
    monkeypatch.setattr(builder, "build", lambda where: calls.append(("build", where)))
    monkeypatch.setattr(builder, "pip", lambda *args, env=None: calls.append(args))
    monkeypatch.setattr(builder, "INSTALLED_INFO", tmp_path / "share" / "llama-cpp-build.json")
    monkeypatch.setattr(builder, "INSTALLED_CONVERTER", tmp_path / "share" / "llama-cpp-converter")
    return target, calls


def test_a_cached_build_is_installed_without_building(builder, tmp_path, monkeypatch):
    target, calls = cached_build(builder, tmp_path, monkeypatch, with_converter=True)
    monkeypatch.setattr(builder, "download_sdist", lambda work: pytest.fail("downloaded the sdist again"))
    builder.main()
    assert calls == [("install", "--quiet", "--no-deps", "--force-reinstall", str(target / "x.whl"))]
    installed = json.loads((tmp_path / "share" / "llama-cpp-build.json").read_text())
    assert installed["llama_cpp_commit"] == "0c1e57098" and installed["converter"]["gguf_py_version"] == "0.19.0"
    converter = tmp_path / "share" / "llama-cpp-converter"
    assert (converter / "convert_hf_to_gguf.py").read_text() == "import gguf\n"
    assert builder.tree_sha256(converter) == installed["converter"]["sha256"]


def test_a_cached_build_without_the_converter_gets_it_from_the_sdist_without_rebuilding(builder, tmp_path,
                                                                                         monkeypatch):
    target, calls = cached_build(builder, tmp_path, monkeypatch, with_converter=False)
    downloads = []

    def download(work):
        downloads.append(work)
        return sdist_with(work, VENDORED)

    monkeypatch.setattr(builder, "download_sdist", download)
    builder.main()
    assert len(downloads) == 1 and not downloads[0].exists()   # the download folder is removed
    assert calls == [("install", "--quiet", "--no-deps", "--force-reinstall", str(target / "x.whl"))]
    cached = json.loads((target / builder.BUILD_INFO).read_text())
    assert cached["converter"]["sha256"] == builder.tree_sha256(target / "converter")
    assert (tmp_path / "share" / "llama-cpp-converter" / "conversion" / "llama.py").exists()


def test_a_changed_cached_converter_is_not_installed(builder, tmp_path, monkeypatch):
    target, _ = cached_build(builder, tmp_path, monkeypatch, with_converter=True)
    (target / "converter" / "conversion" / "llama.py").write_text("# edited\n")
    with pytest.raises(SystemExit, match="does not match its recorded SHA-256"):
        builder.main()
