"""Every stage, base to report, on one GPU at 8B: each stage's wall time, peak GPU memory and peak host memory.

A random-initialized model of Llama 3.1 8B's architecture and dimensions (vocabulary 128256; the embedded model's
tokenizer, whose ids are < 49152, since no real Llama tokenizer can be fetched) goes through check_params, base
(from a local model folder), compliance, tokenize, train (Unsloth, 30 steps), evaluate, merge (under a 24 GiB
GPU-memory cap), quantize (f16 and q4_k_m, each checked in llama.cpp) and report, then `ftpipe.release.verify`.
Each stage runs as `dvc repro` runs it: its `cmd` from dvc.yaml, in a process of its own, in DAG order. DVC
itself is not carried (its ~40 wheels, and hashing 50 GB of outputs twice, do not fit the GPU session); nor are
MLflow and Great Expectations: the stages record their MLflow runs as pending (ftpipe/tracking/pending.py), and
ingest, clean and validate ran here, on the CPU (their outputs travel as data.tar.xz).

Before the 8B run, a smoke run of the same chain on a 135M model of SmolLM2's shape with Unsloth hidden checks
`train.backend: auto` on a GPU without Unsloth: it must train with transformers + peft + bitsandbytes on the GPU
after a warning naming `pip install -e ".[gpu]"`.

Quality numbers from random weights mean nothing; the greedy-agreement bar of the quantize stage is set to 0 for
this run because a random model's logits are near ties (the agreement is still measured and recorded).

    # here (CPU): the default pipeline has run (data/ exists); build the carried payload
    bash ../shared/gpu/make-gpu-site.sh && python bench/gpu_pipeline_8b.py --prepare
    # on the GPU machine (device tool), carrying .gpu-payload:
    python3 bench/gpu_pipeline_8b.py --start                  # unpacks, starts the run in the background
    python3 bench/gpu_pipeline_8b.py --wait 560 --out $OUT    # again and again, until it says done
    # here: copy the returned results.json to bench/results/gpu_pipeline_8b.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = REPO / ".gpu-payload"
SKELETON = PAYLOAD / "base-skeleton"
WHEELS = PAYLOAD / "wheels"
SITE_TAR = PAYLOAD / "site.tar.xz"
DATA_TAR = PAYLOAD / "data.tar.xz"
CARRIED_DATA = ("data/raw", "data/clean", "data/validation", "data/sources")
# Packages the GPU machine's image lacks that the stages from base to report import (the image has torch,
# transformers, peft, accelerate, numpy, pandas, pyarrow, matplotlib, jinja2, sentencepiece, psutil, ...).
WHEEL_PINS = ("gguf==0.19.0", "license-expression==30.4.4", "boolean.py==5.0",
              "cyclonedx-python-lib==11.12.0", "py-serializable==2.2.0", "packageurl-python==0.17.6",
              "defusedxml==0.7.1", "jsonschema==4.26.0", "jsonschema-specifications==2025.9.1",
              "referencing==0.37.0", "rpds-py==2026.9.1", "fqdn==1.6.0", "isoduration==20.11.0", "arrow==1.4.0",
              "jsonpointer==3.12", "rfc3339-validator==0.1.4", "rfc3986-validator==0.1.1", "rfc3987-syntax==1.1.0",
              "lark==1.3.1", "uri-template==1.3.0", "webcolors==25.10.0", "tzdata==2026.6",
              "diskcache==5.6.3")   # llama-cpp-python imports it
CONVERTER = PAYLOAD / "llama-cpp-converter"   # llama.cpp's converter as `make setup` installs it (build_llama_cpp)
STAGES = ("check_params", "base", "compliance", "tokenize", "train", "evaluate", "merge", "quantize", "report")
# The validation split is cut to its first rows (by id) for this run: the merge and quantize stages compute its
# loss with every model they check, llama.cpp on the CPU among them, and at 8B each row costs seconds there.
VALIDATION_ROWS = 10
LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, tie_word_embeddings=False, vocab_size=128256,
                   max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
MERGE_GPU_CAP_GIB = 24
SOURCE = "models/source/random-base"
RUNS = {
    # name: (model config, train.backend, Unsloth visible, params overrides, the stages it runs)
    "llama-3.1-8b": ("llama-3.1-8b", "auto", True, {"train.max_steps": 30, "train.checkpoint_every": 10}, STAGES),
}
# `--smoke` first runs this (1-2 min): train.backend auto on the GPU with Unsloth hidden
SMOKE = {"smoke-135m-no-unsloth": ("skeleton", "auto", False, {"train.max_steps": 10, "train.checkpoint_every": 5},
                                   STAGES[:STAGES.index("train") + 1])}
COMMON_OVERRIDES = {
    "base.model": SOURCE, "evaluate.batch_size": "auto", "evaluate.max_examples": 16,
    "quantize.types": ["f16", "q4_k_m"],
    "quantize.greedy_prompts": 3, "quantize.max_new_tokens": 32, "quantize.min_greedy_agreement": 0.0,
    "compliance.base_model.id": "ftpipe-bench/random-init", "compliance.base_model.revision": "seed 0",
    "compliance.base_model.origin": "random-initialized on the GPU machine by bench/gpu_pipeline_8b.py",
}
# The sitecustomize each stage process runs (on PYTHONPATH): its peak PyTorch GPU memory at exit, and for the
# merge stage a cap on the GPU memory PyTorch may take (torch.cuda.set_per_process_memory_fraction).
HOOK = '''
import atexit, json, os, sys
_cap = os.environ.get("BENCH_GPU_CAP_GIB")
if _cap:
    import torch
    torch.cuda.set_per_process_memory_fraction(
        float(_cap) * 2**30 / torch.cuda.get_device_properties(0).total_memory, 0)
def _peaks():
    torch = sys.modules.get("torch")
    out = os.environ.get("BENCH_PEAKS_FILE")
    if out and torch is not None and torch.cuda.is_initialized():
        with open(out, "w") as f:
            json.dump({"torch_max_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                       "torch_max_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)}, f)
atexit.register(_peaks)
'''


# --- here, on the CPU ------------------------------------------------------------------------------

def prepare() -> None:
    from stages.base import embedded_gguf, load_embedded

    shutil.rmtree(PAYLOAD, ignore_errors=True)
    WHEELS.mkdir(parents=True)
    model, tokenizer = load_embedded(embedded_gguf()[0], "bfloat16")
    model.config.save_pretrained(SKELETON)
    model.generation_config.save_pretrained(SKELETON)
    tokenizer.save_pretrained(SKELETON)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                    "--platform", "any", "-d", str(WHEELS), *WHEEL_PINS], check=True)
    # the llama-cpp-python wheel `make setup` built (tools/build_llama_cpp.py): ctypes bindings and
    # shared libraries, tagged py3-none, so the same wheel installs under the GPU machine's Python 3.12
    shutil.copy2(next((Path.home() / ".cache/ftpipe/wheels").glob("*/llama_cpp_python-*.whl")), WHEELS)
    shutil.copytree(Path(sys.prefix) / "share/ftpipe/llama-cpp-converter", CONVERTER)
    subprocess.run(f"tar -C {REPO / '.gpu-site'} -cf - . | xz -T0 -6 > {SITE_TAR}", shell=True, check=True)
    with tarfile.open(DATA_TAR, "w:xz") as tar:
        for folder in CARRIED_DATA:
            tar.add(REPO / folder, arcname=folder)
    total = sum(p.stat().st_size for p in PAYLOAD.rglob("*") if p.is_file())
    print(f"wrote {PAYLOAD}: {total / 2**20:.1f} MiB")


# --- on the GPU machine ----------------------------------------------------------------------------

def root() -> Path:
    """Where the runs live: beside the repository copy, on the machine's disk (outputs reach ~55 GB)."""
    return REPO.parent / "ftpipe-gpu"


def start(smoke: bool) -> None:
    """Unpack the Unsloth site and the wheels, then start `--run` in a session of its own and return."""
    base = root()
    shutil.rmtree(base, ignore_errors=True)
    (base / "site").mkdir(parents=True)
    subprocess.run(["tar", "-C", str(base / "site"), "-xJf", str(SITE_TAR)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--target", str(base / "wheels"), *map(str, WHEELS.glob("*.whl"))], check=True)
    installed = Path(sys.prefix) / "share/ftpipe/llama-cpp-converter"   # where ftpipe.gguf.export looks
    shutil.rmtree(installed, ignore_errors=True)
    shutil.copytree(CONVERTER, installed)
    (base / "hooks").mkdir()
    (base / "hooks/sitecustomize.py").write_text(HOOK)
    # The same site without Unsloth, for the smoke run: train.backend auto must then fall back to transformers.
    (base / "site-no-unsloth").mkdir()
    for entry in (base / "site").iterdir():
        if not entry.name.startswith(("unsloth", "unsloth_zoo")):
            (base / "site-no-unsloth" / entry.name).symlink_to(entry)
    subprocess.run(["df", "-h", str(base)])
    log = open(base / "run.log", "w")
    command = [sys.executable, str(Path(__file__).resolve()), "--run", *(["--smoke"] if smoke else [])]
    subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    print(f"started; log {base / 'run.log'}")


def set_key(params: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = params
    for part in parents:
        node = node[part]
    if leaf not in node:
        raise KeyError(f"params.yaml has no {dotted}")
    node[leaf] = value


def workdir_for(name: str, overrides: dict) -> Path:
    """A copy of the repository for one run, with its params and the carried data."""
    import yaml

    work = root() / name
    shutil.copytree(REPO, work, ignore=shutil.ignore_patterns(".gpu-payload", ".gpu-site", ".venv",
                                                               "mlflow.db*", "mlartifacts", "__pycache__"))
    with tarfile.open(DATA_TAR) as tar:
        tar.extractall(work, filter="data")
    validation = work / "data/clean/validation.jsonl"
    rows = sorted(validation.read_text().splitlines(keepends=True), key=lambda line: json.loads(line)["id"])
    validation.write_text("".join(rows[:VALIDATION_ROWS]))
    params = yaml.safe_load((work / "params.yaml").read_text())
    for key, value in {**COMMON_OVERRIDES, **overrides}.items():
        set_key(params, key, value)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return work


def build_source(config_name: str, work: Path) -> None:
    """models/source/random-base: a random-initialized model in bf16 safetensors with the skeleton's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(SKELETON)
    if config_name == "skeleton":
        config = AutoConfig.from_pretrained(SKELETON)
    else:
        config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **LLAMA_31_8B)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    folder = work / SOURCE
    model.save_pretrained(folder, max_shard_size="5GB")
    for name in os.listdir(SKELETON):
        if name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy2(SKELETON / name, folder / name)
    parameters = sum(p.numel() for p in model.parameters())
    (folder / "bench-source.json").write_text(json.dumps({"config": config_name, "parameters": parameters}))


class Sampler(threading.Thread):
    """Peak host memory (RSS of the stage's process tree) and GPU memory in use (NVML), every 0.25 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        import psutil
        import pynvml

        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.nvml, self.process = pynvml, psutil.Process(pid)
        self.peak_rss = self.peak_gpu = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stopped.is_set():
            try:
                rss = sum(p.memory_info().rss for p in [self.process, *self.process.children(recursive=True)])
                self.peak_rss = max(self.peak_rss, rss)
            except psutil.Error:
                pass
            self.peak_gpu = max(self.peak_gpu, self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
            time.sleep(0.25)


def stage_commands(work: Path, names: tuple[str, ...]) -> dict[str, str]:
    import yaml

    stages = yaml.safe_load((work / "dvc.yaml").read_text())["stages"]
    return {name: stages[name]["cmd"] for name in names}


def run_stage(work: Path, name: str, command: str, env: dict) -> dict:
    peaks_file = root() / f"peaks-{work.name}-{name}.json"
    stage_env = {**env, "DVC_STAGE": name, "DVC_ROOT": str(work), "BENCH_PEAKS_FILE": str(peaks_file)}
    if name == "merge":
        stage_env["BENCH_GPU_CAP_GIB"] = str(MERGE_GPU_CAP_GIB)
    argv = command.split()
    if argv[0] == "python":
        argv[0] = sys.executable
    log_path = root() / f"{work.name}-{name}.log"
    started = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, cwd=work, env=stage_env, stdout=log, stderr=subprocess.STDOUT)
        sampler = Sampler(process.pid)
        sampler.start()
        code = process.wait()
        sampler.stopped.set()
        sampler.join()
    result = {"stage": name, "command": command, "exit": code, "seconds": round(time.time() - started, 1),
              "peak_host_rss_gib": round(sampler.peak_rss / 2**30, 2),
              "peak_gpu_used_gib": round(sampler.peak_gpu / 2**30, 2)}
    if peaks_file.exists():
        result.update(json.loads(peaks_file.read_text()))
    if name == "merge":
        result["gpu_cap_gib"] = MERGE_GPU_CAP_GIB
    metrics = work / "metrics" / f"{name}.json"
    if code == 0 and metrics.exists():
        result["metrics"] = json.loads(metrics.read_text())
    if code != 0:
        result["log_tail"] = log_path.read_text(errors="replace")[-4000:]
    return result


def run_all(smoke: bool) -> None:
    base = root()
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": {}, "state": "running"}

    def save() -> None:
        (base / "results.json").write_text(json.dumps(results, indent=1))

    import pynvml

    pynvml.nvmlInit()
    results["gpu"] = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
    runs = {**SMOKE, **RUNS} if smoke else RUNS
    for run_name, (config_name, backend, unsloth_visible, overrides, names) in runs.items():
        run: dict = {"stages": []}
        results["runs"][run_name] = run
        work = workdir_for(run_name, {**overrides, "train.backend": backend})
        site = base / ("site" if unsloth_visible else "site-no-unsloth")
        env = {**os.environ, "PYTHONPATH": f"{base / 'hooks'}:{site}:{base / 'wheels'}:{work}",
               "PYTHONUNBUFFERED": "1"}
        started = time.time()
        # in a process of its own: this one must hold no CUDA context, or it would count in every stage's peak
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--build-source", config_name, str(work)],
                       check=True)
        run["source"] = json.loads((work / SOURCE / "bench-source.json").read_text())
        run["source"]["seconds"] = round(time.time() - started, 1)
        save()
        for name, command in stage_commands(work, names).items():
            result = run_stage(work, name, command, env)
            run["stages"].append(result)
            save()
            if result["exit"] != 0:
                results["state"] = f"failed at {run_name}/{name}"
                save()
                return
            if name == "base":   # the source's weights are in models/base now: free ~16 GB of disk
                shutil.rmtree(work / SOURCE)
        train_log = (base / f"{run_name}-train.log").read_text(errors="replace")
        run["train_warnings"] = [line for line in train_log.splitlines() if "warning" in line.lower()][:10]
        run["mlflow_pending_records"] = sorted(path.name for path in (work / "mlflow-pending").glob("*.json"))
        save()
        if "report" not in names:
            shutil.rmtree(work)
            continue
        verify = subprocess.run([sys.executable, "-m", "ftpipe.release.verify", "--json"], cwd=work, env=env,
                                capture_output=True, text=True)
        run["verify"] = {"exit": verify.returncode, "output": verify.stdout[-6000:] or verify.stderr[-3000:]}
    results["state"] = "done"
    save()


def wait(seconds: float, out: Path) -> None:
    """Wait for the background run (at most `seconds`), then copy its results and logs' tails into `out`."""
    base = root()
    deadline = time.time() + seconds
    while time.time() < deadline:
        state = json.loads((base / "results.json").read_text()).get("state") if (base / "results.json").exists() \
            else "starting"
        if state != "running" and state != "starting":
            break
        time.sleep(5)
    out.mkdir(parents=True, exist_ok=True)
    for path in [base / "results.json", base / "run.log", *sorted(base.glob("*.log"))]:
        if path.exists():
            (out / path.name).write_text(path.read_text(errors="replace")[-20000:])
    if (base / "results.json").exists():
        results = json.loads((base / "results.json").read_text())
        print("state:", results["state"])
        for run_name, run in results["runs"].items():
            for stage in run["stages"]:
                print(run_name, stage["stage"], stage["exit"], stage["seconds"], "s", stage["peak_gpu_used_gib"],
                      "GiB gpu", stage["peak_host_rss_gib"], "GiB rss")
    else:
        print((base / "run.log").read_text(errors="replace")[-3000:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true")
    parser.add_argument("--start", action="store_true")
    parser.add_argument("--run", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="first the 135M run without Unsloth")
    parser.add_argument("--wait", type=float)
    parser.add_argument("--build-source", nargs=2, metavar=("CONFIG", "WORKDIR"))
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    if args.prepare:
        prepare()
    elif args.start:
        start(args.smoke)
    elif args.run:
        run_all(args.smoke)
    elif args.build_source:
        build_source(args.build_source[0], Path(args.build_source[1]))
    elif args.wait is not None:
        wait(args.wait, args.out)


if __name__ == "__main__":
    main()
