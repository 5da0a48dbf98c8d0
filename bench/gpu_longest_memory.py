"""GPU memory of one batch-1 training step of the 8B model at growing lengths, for two fixed plans (every
decoder layer offloaded, every layer recomputed): what the memory model of the longest-context search
(gpu_train_plan.py, longest_probe) must predict, measured per phase (after the forward pass, the forward and the
backward pass's peaks), on the stage's model setup (Unsloth, NF4, LoRA r=16).

Why it exists: on 2026-12-03 the stage's memory model, fitted on the stage's probe at 16k tokens, predicted 118 GiB
for a 344,064-token step that ran out of the H200's 139 GiB. These measurements show why (results in
bench/results/gpu_longest_memory.json, BENCHMARKS.md "The training plan against Unsloth").

Rerun on the GPU machine (device tool, carrying .gpu-payload; see gpu_train_plan.py for the payload):
    python3 bench/gpu_longest_memory.py --go $OUT/gpu_longest_memory.json
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import gpu_train_plan as plan_bench

LENGTHS = (8192, 32768, 65536, 131072)


def measure(out: Path) -> None:
    import torch
    import unsloth  # noqa: F401 - before transformers and peft
    from transformers import set_seed

    from ftpipe.model.modeling import padding_free_batch
    from ftpipe.model.training import load_trainable_model, offload_function
    from ftpipe.model.training_plan import Plan, apply_plan, decoder_layers

    args = plan_bench.argument_parser().parse_args([])   # the bench's default settings
    set_seed(plan_bench.SEED)
    model = load_trainable_model("unsloth", plan_bench.train_params(args, {"steps": 1}, "auto", 1),
                                 plan_bench.root() / "model-8b", plan_bench.LONGEST, "bfloat16")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
    offload, layers = offload_function(model), len(decoder_layers(model))
    base = torch.cuda.memory_allocated()
    rows = []
    for name, plan in (("offload_all", Plan(1, 0, layers, layers)), ("recompute_all", Plan(1, layers, 0, layers))):
        apply_plan(model, plan, offload)
        for length in LENGTHS:
            batch = {key: value.cuda() for key, value in
                     padding_free_batch(plan_bench.one_long_row(length, seed=0)).items()}
            record, began = {"plan": name, "L": length}, time.time()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            try:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(**batch, use_cache=False).loss
                torch.cuda.synchronize()
                record["after_fwd_alloc"] = (torch.cuda.memory_allocated() - base) / 2**30
                record["fwd_peak"] = (torch.cuda.max_memory_allocated() - base) / 2**30
                torch.cuda.reset_peak_memory_stats()
                loss.backward()
                torch.cuda.synchronize()
                record["bwd_peak"] = (torch.cuda.max_memory_allocated() - base) / 2**30
                optimizer.step()
                torch.cuda.synchronize()
            except torch.OutOfMemoryError as error:
                record["oom"] = str(error)[:300]
            loss = batch = None
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            record["s"] = round(time.time() - began, 1)
            rows.append(record)
            print(record, flush=True)
            out.write_text(json.dumps({"base_gib": base / 2**30, "rows": rows}, indent=1))
            if "oom" in record:
                break


def main() -> None:
    if sys.argv[1] == "--go":   # unpack the site and build the model (once per machine), then measure there
        env = plan_bench.site_environment()
        if not (plan_bench.root() / "model-8b/provenance.json").exists():
            subprocess.run([sys.executable, plan_bench.__file__, "--build", "8b"], env=env, check=True)
        subprocess.run([sys.executable, __file__, sys.argv[2]], env=env, check=True)
    else:
        measure(Path(sys.argv[1]))


if __name__ == "__main__":
    main()
