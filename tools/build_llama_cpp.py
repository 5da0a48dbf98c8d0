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
        # --no-binary names the package alone: ":all:" would also build its build tools (CMake!) from source
        pip("download", "--quiet", "--no-deps", "--no-binary", PACKAGE, f"{PACKAGE}=={VERSION}", "-d", str(work))
        sdist = next(work.glob("*.tar.gz"))
        print(f"build_llama_cpp: building {sdist.name} with CMAKE_ARGS={CMAKE_ARGS!r} (about 7-10 minutes on 2 cores)",
              flush=True)
        pip("wheel", "--quiet", "--no-deps", "-w", str(work), str(sdist),
            env={**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "FORCE_CMAKE": "1"})
        wheel = next(work.glob("*.whl"))
        info = {"package": PACKAGE, "version": VERSION, "llama_cpp_commit": llama_cpp_commit(sdist),
                "cmake_args": CMAKE_ARGS, "compiler": compiler(), "platform": sysconfig.get_platform(),
                "python": platform.python_version(), "wheel": wheel.name,
                "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()}
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
    pip("install", "--quiet", "--no-deps", "--force-reinstall", str(target / info["wheel"]))
    INSTALLED_INFO.parent.mkdir(parents=True, exist_ok=True)
    INSTALLED_INFO.write_text(json.dumps(info, indent=2) + "\n")
    print(f"build_llama_cpp: {PACKAGE} {VERSION} (llama.cpp {info['llama_cpp_commit']}, {CMAKE_ARGS}) installed "
          f"from {target}")


if __name__ == "__main__":
    main()
