"""Peak memory of the merge stage's shard-by-shard merge (ftpipe.model.merging) against the merge it replaced
(PEFT's merge_and_unload on the base loaded whole in float32), on a random-initialized Llama saved in shards
and a random LoRA adapter on all its linear layers.

Nothing is downloaded: the base is built from a config's dimensions (`--config llama-3.2-1b`: Llama 3.2 1B,
1.24B parameters, tied embeddings; `llama-3.1-8b`: Llama 3.1 8B, 8.03B, untied; `tiny` to try the script),
its tensors drawn at random and written shard by shard (no model is ever materialized); the adapter's names,
shapes and adapter_config.json come from PEFT (get_peft_model on the model built on the meta device), its
values at random (B is not zero: every update is real). Each merge runs in a fresh process; its peak RSS is
the kernel's high-water mark for that process (VmHWM in /proc/self/status: getrusage's ru_maxrss would also
count the parent's memory at fork, which exec keeps), and a thread sampling /proc/self/status every 20 ms
splits it into anonymous memory (heap, tensors) and the file pages mapped from the shards (safe_open's
mmap). On a GPU it also records torch.cuda.max_memory_allocated; --gpu-memory-cap-gib N caps the process
(set_per_process_memory_fraction) as a GPU of N GiB would. Finally the outputs are compared tensor by tensor
(new vs old; and new vs new-cpu, the GPU's rounding against the CPU's, with --methods new,new-cpu,old).

    .venv/bin/python bench/merge_memory.py                                  # here: writes merge_memory_cpu.json
    # on the GPU machine (its python3 has torch, transformers, peft; nothing to carry), in about 2 minutes:
    python3 bench/merge_memory.py --config llama-3.1-8b --dtype bfloat16 --shard-size-mb 5000 \\
        --gpu-memory-cap-gib 24 --out $OUT/merge_memory_gpu.json             # the old merge: out of memory
    python3 bench/merge_memory.py --config llama-3.1-8b --dtype bfloat16 --shard-size-mb 5000 \\
        --out $OUT/merge_memory_gpu_uncapped.json                           # both, and their outputs compared

The models go under --workdir (default /tmp/merge-memory, reused by later runs of the same spec), never into
the repository.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {   # the released models' dimensions (config.json of meta-llama/Llama-3.2-1B and Llama-3.1-8B)
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
METHODS = {"new": "the shard-by-shard merge (ftpipe.model.merging), on the GPU when there is one",
           "new-cpu": "the same with the update computed on the CPU",
           "old": "merge_and_unload on the base loaded whole in float32 (the merge stage before)"}
SAMPLE_SECONDS = 0.02   # /proc/self/status sampling period: tensors take far longer than this to come and go


def llama_config(name: str, dtype: str):
    from transformers import LlamaConfig

    return LlamaConfig(max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, dtype=dtype,
                       **CONFIGS[name])


# --- building the base and the adapter ------------------------------------------------------------------

def build_base(config_name: str, dtype: str, shard_bytes: int, folder: Path, seed: int) -> dict:
    """Random weights (normal, std 0.02; norms 1) of the config's tensors, in `dtype`, in shards of at most
    `shard_bytes` with transformers' names and index: one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from ftpipe.model.modeling import torch_dtype
    from ftpipe.model.shards import INDEX_FILE

    config = llama_config(config_name, dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()
              if not (config.tie_word_embeddings and name == "lm_head.weight")}   # tied: stored once
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    target = torch_dtype(dtype)
    shards: list[dict] = [{}]
    size = 0
    for name, shape in shapes.items():
        tensor = (torch.ones(shape, dtype=target) if name.endswith("norm.weight")
                  else (torch.randn(shape, generator=generator) * 0.02).to(target))
        if shards[-1] and size + tensor.nbytes > shard_bytes:
            shards[-1] = write_shard(shards[-1], folder, len(shards), save_file)
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    shards[-1] = write_shard(shards[-1], folder, len(shards), save_file)
    total = len(shards)
    weight_map = {}
    for number, names in enumerate(shards, 1):
        final = f"model-{number:05d}-of-{total:05d}.safetensors"
        (folder / f"part-{number}.safetensors").rename(folder / final)
        weight_map.update({name: final for name in names})
    size_bytes = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": size_bytes}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    parameters = sum(_count(shape) for shape in shapes.values())
    return {"config": config_name, "dims": CONFIGS[config_name], "dtype": dtype, "parameters": parameters,
            "size_bytes": size_bytes, "shards": total, "max_shard_bytes": shard_bytes}


def write_shard(tensors: dict, folder: Path, number: int, save_file) -> list[str]:
    save_file(tensors, str(folder / f"part-{number}.safetensors"), metadata={"format": "pt"})
    return list(tensors)


def build_adapter(config_name: str, dtype: str, rank: int, folder: Path, seed: int) -> dict:
    """A PEFT LoRA adapter (r=`rank`, alpha 2r, every linear layer of the blocks) with random factors."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = get_peft_model(LlamaForCausalLM(llama_config(config_name, dtype)),
                               LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGET_MODULES,
                                          task_type="CAUSAL_LM"))
        shapes = {name: tuple(tensor.shape) for name, tensor in get_peft_model_state_dict(model).items()}
    generator = torch.Generator().manual_seed(seed)
    # A as PEFT's kaiming init scales it (~1/sqrt(in)); B as a trained one might be: small, not zero
    tensors = {name: torch.randn(shape, generator=generator) * (shape[1] ** -0.5 if ".lora_A." in name else 0.01)
               for name, shape in shapes.items()}
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    model.peft_config["default"].save_pretrained(str(folder))
    return {"rank": rank, "alpha": 2 * rank, "target_modules": TARGET_MODULES, "lora_weights": len(shapes) // 2,
            "size_bytes": (folder / "adapter_model.safetensors").stat().st_size}


def _count(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


# --- one merge, measured in its own process -----------------------------------------------------------------

class MemorySampler(threading.Thread):
    """Peaks of RssAnon (heap, tensors) and RssFile (mapped file pages) sampled from /proc/self/status, and
    VmHWM, the kernel's own peak RSS of this process."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmHWM": 0}
        self.running = True

    def sample(self) -> dict[str, int]:
        values = {}
        with open("/proc/self/status") as status:
            for line in status:
                key = line.split(":")[0]
                if key in self.peaks:
                    values[key] = int(line.split()[1]) * 1024
        for key, value in values.items():
            self.peaks[key] = max(self.peaks[key], value)
        return values

    def run(self) -> None:
        while self.running:
            self.sample()
            time.sleep(SAMPLE_SECONDS)


def old_merge(base: Path, adapter: Path, dtype: str, out: Path) -> None:
    """The merge stage's merge_adapter before this change (without its tokenizer: the random base has none)."""
    from ftpipe.model.modeling import load_model, torch_dtype

    model = load_model(base, "float32", adapter_dir=adapter)
    merged = model.merge_and_unload().to(torch_dtype(dtype))
    merged.save_pretrained(str(out))


def measure(method: str, base: Path, adapter: Path, out: Path, dtype: str, cap_gib: float | None) -> dict:
    import peft  # noqa: F401 - imported before the baseline by both methods: the same starting point
    import torch
    import transformers  # noqa: F401

    from ftpipe.model.merging import merge_lora_shards

    cuda = torch.cuda.is_available()
    if cuda and cap_gib:
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, cap_gib * 2 ** 30 / torch.cuda.get_device_properties(0).total_memory))
    sampler = MemorySampler()
    baseline = sampler.sample()["VmRSS"]
    sampler.start()
    out.mkdir(parents=True)
    started = time.perf_counter()
    error = None
    try:
        if method.startswith("new"):   # new-cpu: the update computed on the CPU even beside a GPU
            merge_lora_shards(base, adapter, dtype, out, device="cpu" if method == "new-cpu" else None)
        else:
            old_merge(base, adapter, dtype, out)
    except torch.OutOfMemoryError as oom:   # the old merge at 8B under a 24 GiB cap: the point of the change
        error = f"{type(oom).__name__}: {str(oom).splitlines()[0]}"
    seconds = time.perf_counter() - started
    sampler.running = False
    sampler.join()
    result = {"seconds": round(seconds, 1), "peak_rss_bytes": sampler.sample()["VmHWM"],
              "baseline_rss_bytes": baseline, "peak_rss_anon_bytes": sampler.peaks["RssAnon"],
              "peak_rss_file_bytes": sampler.peaks["RssFile"], "device": "cuda" if cuda else "cpu"}
    if cuda:
        result["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
        result["gpu_memory_cap_gib"] = cap_gib
    if error:
        result["error"] = error
    return result


def run_measure(method: str, args, base: Path, adapter: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, __file__, "--measure", method, "--base", str(base), "--adapter", str(adapter),
               "--merged", str(out), "--dtype", args.dtype]
    if args.gpu_memory_cap_gib:
        command += ["--gpu-memory-cap-gib", str(args.gpu_memory_cap_gib)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(first: Path, second: Path) -> dict:
    """Tensor by tensor (one at a time): how many are bitwise equal, how many elements differ, and by how much
    at most, also in steps of the 16-bit dtype (the distance between the bit patterns, for same-sign values)."""
    import torch
    from safetensors import safe_open

    def where(folder: Path) -> dict[str, Path]:
        found = {}
        for path in folder.glob("*.safetensors"):
            with safe_open(str(path), "pt") as handle:
                found.update({name: path for name in handle.keys()})
        return found

    left, right = where(first), where(second)
    identical, differing, largest, steps = 0, 0, 0.0, 0
    for name in left.keys() & right.keys():
        with safe_open(str(left[name]), "pt") as a, safe_open(str(right[name]), "pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
        if x.dtype == y.dtype and x.equal(y):
            identical += 1
            continue
        differing += int((x != y).sum())
        largest = max(largest, (x.float() - y.float()).abs().max().item())
        if x.dtype == y.dtype and x.element_size() == 2 and x.is_floating_point():
            same_sign = (x >= 0) == (y >= 0)
            distance = (x.view(torch.int16).int() - y.view(torch.int16).int()).abs()
            steps = max(steps, int(distance[same_sign].max()) if same_sign.any() else 0)
    return {"tensors": [len(left), len(right)], "shared": len(left.keys() & right.keys()),
            "bitwise_identical": identical, "differing_elements": differing, "max_abs_difference": largest,
            "max_16bit_steps": steps}


def machine() -> dict:
    import psutil
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "ram_bytes": psutil.virtual_memory().total, "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="llama-3.2-1b")
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--shard-size-mb", type=int, default=200)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--methods", default="new,old", help=f"comma-separated, of: {METHODS}")
    parser.add_argument("--gpu-memory-cap-gib", type=float, default=None)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/merge-memory"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--measure", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--adapter", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--merged", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:   # the worker: one merge, its measurements on stdout's last line
        print(json.dumps(measure(args.measure, args.base, args.adapter, args.merged, args.dtype,
                                 args.gpu_memory_cap_gib)))
        return

    import torch

    import ftpipe  # noqa: F401 - offline environment

    spec = {"config": args.config, "dtype": args.dtype, "shard_bytes": args.shard_size_mb * 10 ** 6,
            "rank": args.rank, "seed": 0}
    root = args.workdir / f"{args.config}-{args.dtype}-{args.shard_size_mb}mb-r{args.rank}"
    if not (root / "spec.json").exists() or json.loads((root / "spec.json").read_text())["spec"] != spec:
        shutil.rmtree(root, ignore_errors=True)
        started = time.perf_counter()
        model = build_base(args.config, args.dtype, spec["shard_bytes"], root / "base", seed=0)
        adapter = build_adapter(args.config, args.dtype, args.rank, root / "adapter", seed=1)
        (root / "spec.json").write_text(json.dumps({"spec": spec, "model": model, "adapter": adapter}))
        print(f"built {root} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    built = json.loads((root / "spec.json").read_text())
    merges = {}
    for method in args.methods.split(","):
        merges[method] = run_measure(method, args, root / "base", root / "adapter", root / f"merged-{method}")
        print(f"{method}: {json.dumps(merges[method])}", file=sys.stderr)
    result = {"machine": machine(), "model": built["model"], "adapter": built["adapter"], "merges": merges,
              "command": "python bench/merge_memory.py " + " ".join(sys.argv[1:])}
    done = [method for method, merge in merges.items() if not merge.get("error")]
    result["outputs"] = {f"{first} vs {second}": compare(root / f"merged-{first}", root / f"merged-{second}")
                         for first, second in (("new", "old"), ("new", "new-cpu"), ("new-cpu", "old"))
                         if first in done and second in done}
    for method in merges:   # the merged copies are rebuilt each run; the base and adapter are kept for reuse
        shutil.rmtree(root / f"merged-{method}", ignore_errors=True)
    out = args.out or REPO / "bench/results" / f"merge_memory_{'gpu' if torch.cuda.is_available() else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
