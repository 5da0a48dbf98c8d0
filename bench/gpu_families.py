"""The eight model families' test suite (tests/families/) on a CUDA GPU, once per GPU training backend: each tiny
model through base, tokenize, train (Unsloth, then transformers + peft + bitsandbytes on the GPU), evaluate, merge
and quantize, with every assertion the CPU run makes. Writes bench/results/gpu_families.json: per backend, per test,
passed or the failure's last lines.

    # here (CPU): the payload of bench/gpu_pipeline_8b.py (Unsloth site, wheels, llama.cpp's converter)
    bash ../shared/gpu/make-gpu-site.sh && python bench/gpu_pipeline_8b.py --prepare
    # on the GPU machine (device tool), carrying .gpu-payload (about 5 minutes):
    python3 bench/gpu_families.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = REPO / ".gpu-payload"
BACKENDS = ("unsloth", "transformers")


def install(root: Path) -> dict[str, str]:
    """The Unsloth site and the wheels unpacked under `root`, llama.cpp's converter where ftpipe looks for it; the
    environment the tests run in."""
    (root / "site").mkdir(parents=True)
    subprocess.run(["tar", "-C", str(root / "site"), "-xJf", str(PAYLOAD / "site.tar.xz")], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(root / "wheels"), *map(str, (PAYLOAD / "wheels").glob("*.whl"))], check=True)
    installed = Path(sys.prefix) / "share/ftpipe/llama-cpp-converter"
    shutil.rmtree(installed, ignore_errors=True)
    shutil.copytree(PAYLOAD / "llama-cpp-converter", installed)
    return {**os.environ, "PYTHONPATH": f"{root / 'site'}:{root / 'wheels'}:{REPO}", "PYTHONUNBUFFERED": "1"}


def run_suite(backend: str, env: dict[str, str], root: Path) -> dict:
    report = root / f"junit-{backend}.xml"
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/families",
                           f"--junitxml={report}"], cwd=REPO, env={**env, "FTPIPE_FAMILIES_BACKEND": backend},
                          capture_output=True, text=True)
    tests = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        failure = case.find("failure") if case.find("failure") is not None else case.find("error")
        tests[case.get("name")] = "passed" if failure is None else (failure.get("message") or "")[-600:]
    return {"exit": done.returncode, "seconds": round(time.time() - started, 1),
            "passed": sum(result == "passed" for result in tests.values()), "tests": tests,
            "output_tail": done.stdout[-3000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ftpipe-families-"))
    env = install(root)
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    results = {"gpu": gpu.stdout.strip(), "backends": {}}
    for backend in BACKENDS:
        results["backends"][backend] = run_suite(backend, env, root)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_families.json").write_text(json.dumps(results, indent=1) + "\n")
    for backend, result in results["backends"].items():
        print(f"{backend}: {result['passed']} of {len(result['tests'])} passed in {result['seconds']} s")


if __name__ == "__main__":
    main()
