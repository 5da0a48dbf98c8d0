"""The standard benchmarks: EleutherAI's lm-evaluation-harness (lm-eval, pinned at 0.4.13) on the base model and on
the tuned model (the base with its LoRA adapter), for the tasks `evaluate.harness.tasks` lists (none by default).

Why the harness: it is the field's shared yardstick. Its task definitions (prompts, few-shot sampling, metrics,
task versions) are what published numbers use, so our numbers for e.g. arc_easy or hellaswag mean what they mean
elsewhere; writing our own would give numbers nobody else can compare against. It is pinned because a task's
prompt or metric can change between releases (each task carries a version, kept in the results): numbers are only
comparable between runs of the same harness version. `run_harness` refuses to run under any other version.

Offline: `import ftpipe` sets HF_HUB_OFFLINE and HF_DATASETS_OFFLINE, and nothing here lifts that. The model and the
adapter are local folders. The harness's built-in tasks download their datasets from the Hugging Face Hub; offline,
a built-in task runs only if its dataset is already in the local HF datasets cache (otherwise a PipelineError says
how to fetch it once). A local task (a YAML under `evaluate.harness.include_path`, see
evaluation/harness_tasks/README.md) whose data are local files needs nothing from the network.

Results (`run_harness`) are a compact, JSON-able dict for MLflow and the report:

    {"harness_version": "0.4.13",
     "tasks": {task: {metric: value, metric + "_stderr": value, ...}},   # groups (e.g. mmlu) included
     "n_samples": {task: n},                                              # documents scored (after limit)
     "higher_is_better": {task: {metric: bool}},
     "versions": {task: version}, "n_shot": {task: n},
     "config": {...what ran...}}

A metric is named as the harness names it without its filter when the filter is "none" ("acc,none" -> "acc");
other filters follow after a slash ("exact_match,strict-match" -> "exact_match/strict-match"), a name MLflow
accepts. A value that is not a number (a stderr of "N/A") is left out; NaN becomes None.
`compare(base, tuned)` gives, per task and metric, the base value, the tuned value and the change.

GGUF (`run_harness_gguf`): the harness's `gguf` model type does not load a GGUF itself; it posts to the
/v1/completions endpoint of a llama.cpp-compatible server, asking for `logprobs` 10 with `echo` true and
`max_tokens` 1 on prompt + continuation, and reads choices[0].logprobs.{tokens, text_offset, token_logprobs,
top_logprobs}: it sums the token log-probabilities from the first token at or after the context's length up to,
not including, the last token (the one generated). llama-cpp-python's server (`python -m llama_cpp.server`,
logits_all on by default) answers in exactly that shape, but its echo log-probabilities are right only for a GGUF
whose tokenizer adds a BOS token (tokenizer.ggml.add_bos_token true: Llama 2/3, Mistral, Gemma). It pairs token i of
the echoed text with row i of the logits after dropping a leading BOS; without a BOS, row i is the distribution of
token i + 1, so every echoed value is the log-probability of the token under the *next* position's distribution
(measured on the tiny test model against transformers: the values match that shift within 0.01, not the true
ones), and the generated token has no row left, so the harness's "up to the last token" drops the continuation
itself (a one-token answer scores 0.0 for every choice). The harness would report numbers with no error. SmolLM2
and Qwen2/2.5 GGUFs add no BOS, so `run_harness_gguf` checks the GGUF's metadata first and refuses such a file
with a PipelineError. Also through this path: loglikelihood_rolling tasks (wikitext, perplexity) are not supported
by the harness's gguf model, and generative tasks are capped at the server's default of 16 new tokens with its
repeat_penalty of 1.1 (the harness sends neither), so only log-likelihood tasks (multiple choice) are comparable
with the HF runs.
"""
from __future__ import annotations

import contextlib
import difflib
import math
import numbers
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

from ftpipe.core.errors import PipelineError
from ftpipe.core.processes import stop_process_group

HARNESS_VERSION = "0.4.13"
SERVER_HOST = "127.0.0.1"
SERVER_START_TIMEOUT_S = 120.0


# --- public API ---------------------------------------------------------------------------------------------------

def run_harness(tasks: list[str], model_dir: Path, adapter_dir: Path | None, include_path: Path | None,
                limit: int | None, num_fewshot: int | None, batch_size: int, dtype: str, device: str) -> dict:
    """Run the harness's `tasks` on the HF model in `model_dir` (with the PEFT adapter in `adapter_dir` applied when
    given) and return the compact results (module docstring). `include_path`: a folder of local task YAMLs, or None.
    `limit`: documents per task (None: all). `num_fewshot`: None keeps each task's own default. An empty `tasks`
    loads nothing and returns empty results."""
    config = {"model": "hf", "model_dir": str(model_dir), "adapter_dir": str(adapter_dir) if adapter_dir else None,
              "tasks": list(tasks), "include_path": str(include_path) if include_path else None, "limit": limit,
              "num_fewshot": num_fewshot, "batch_size": batch_size, "dtype": dtype, "device": device}
    if not tasks:
        return _empty_results(config)
    _check_harness_version()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager, specs = load_tasks(tasks, include_path, metadata={"pretrained": str(model_dir)})
    model_args: dict[str, Any] = {"pretrained": str(model_dir), "dtype": dtype, "device": device,
                                  "batch_size": batch_size}
    if adapter_dir is not None:
        model_args["peft"] = str(adapter_dir)
    lm = HFLM(**model_args)
    raw = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                  log_samples=False)
    return compact_results(raw, config)


def run_harness_gguf(tasks: list[str], gguf_path: Path, include_path: Path | None, limit: int | None,
                     num_fewshot: int | None) -> dict:
    """Run the harness's `tasks` on a GGUF file through llama.cpp: start llama-cpp-python's OpenAI-compatible server
    on a free loopback port, point the harness's `gguf` model at it, and stop the server afterwards (also on error).
    Same result shape as `run_harness`. Only for a GGUF whose tokenizer adds a BOS token (module docstring: without
    one, llama-cpp-python's echoed log-probabilities are shifted by a token and the harness's numbers are wrong)."""
    config = {"model": "gguf", "gguf_path": str(gguf_path), "tasks": list(tasks),
              "include_path": str(include_path) if include_path else None, "limit": limit,
              "num_fewshot": num_fewshot, "server": "llama_cpp.server",
              "llama_cpp_python": _version("llama-cpp-python")}
    if not tasks:
        return _empty_results(config)
    if not gguf_path.is_file():
        raise PipelineError(f"harness on GGUF: {gguf_path} is not a file")
    _check_adds_bos(gguf_path)
    _check_harness_version()
    import lm_eval

    with llama_cpp_server(gguf_path) as base_url:
        manager, specs = load_tasks(tasks, include_path, metadata={"base_url": base_url})
        raw = lm_eval.simple_evaluate(model="gguf", model_args={"base_url": base_url}, tasks=specs,
                                      task_manager=manager, limit=limit, num_fewshot=num_fewshot, log_samples=False)
    return compact_results(raw, config)


def compare(base: dict, tuned: dict) -> dict:
    """{task: {metric: {"base", "tuned", "change"}}} over the tasks and metrics of either run (stderr entries left
    out); "change" is tuned - base, None where either is missing or None. "higher_is_better" is added where the
    harness says which way is better."""
    comparison: dict[str, dict[str, dict]] = {}
    for task in sorted(set(base.get("tasks", {})) | set(tuned.get("tasks", {}))):
        base_metrics, tuned_metrics = base.get("tasks", {}).get(task, {}), tuned.get("tasks", {}).get(task, {})
        direction = {**base.get("higher_is_better", {}).get(task, {}),
                     **tuned.get("higher_is_better", {}).get(task, {})}
        rows = {}
        for metric in sorted(set(base_metrics) | set(tuned_metrics)):
            if _is_stderr(metric):
                continue
            before, after = base_metrics.get(metric), tuned_metrics.get(metric)
            row = {"base": before, "tuned": after,
                   "change": after - before if before is not None and after is not None else None}
            better = direction.get(metric, direction.get(metric.partition("/")[0]))
            if better is not None:
                row["higher_is_better"] = better
            rows[metric] = row
        comparison[task] = rows
    return comparison


# --- tasks --------------------------------------------------------------------------------------------------------

def load_tasks(names: list[str], include_path: Path | None, metadata: dict | None = None) -> tuple[Any, list]:
    """(TaskManager, the loaded Task/Group objects for simple_evaluate), with a PipelineError a user can act on for an
    unknown name, an include_path that is not a folder, a Hub dataset missing from the offline cache, or a missing
    local data file. When every name is a local task, only include_path is indexed (indexing the harness's own
    ~15,000 tasks takes ~8 s); otherwise both."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise PipelineError(f"evaluate.harness.include_path: {include_path} is not a folder (it holds local task "
                            "YAMLs; see evaluation/harness_tasks/README.md)")
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False, metadata=metadata)
        if all(name in local.all_tasks for name in names):
            try:
                return local, _build(local, names)
            except KeyError:   # a local group naming one of the harness's own tasks: index those too
                pass
    manager = TaskManager(include_path=str(include_path) if include_path else None, metadata=metadata)
    unknown = [name for name in names if name not in manager.all_tasks and not _is_task_file(name)]
    if unknown:
        raise PipelineError(_unknown_message(unknown[0], manager.all_tasks, include_path))
    return manager, _build(manager, names)


def _build(manager, names: list[str]) -> list:
    """Each name loaded on its own (so an error names it): a group stays a group (its aggregate is reported),
    a tag expands to its tasks."""
    specs: list = []
    for name in names:
        try:
            loaded = manager.load([name])
        except ConnectionError as err:
            raise PipelineError(
                f"harness task {name!r}: its dataset is not in the local Hugging Face datasets cache, and the "
                f"pipeline runs offline ({err}). Built-in harness tasks read their datasets from the Hub: fetch it "
                "once on a machine with network, e.g. `HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 python -c \"from "
                f"lm_eval.tasks import TaskManager; TaskManager().load(['{name}'])\"`, and copy the datasets cache "
                "(HF_DATASETS_CACHE, default ~/.cache/huggingface/datasets) here; or define a local task under "
                "evaluate.harness.include_path") from err
        except FileNotFoundError as err:
            raise PipelineError(
                f"harness task {name!r}: a data file was not found ({err}). data_files in a task YAML are read "
                "from the working directory (the project root), not from the YAML's folder") from err
        groups = loaded.get("groups") or {}
        children = {child for group in groups.values() for child in group.child_names}
        top_groups = [group for group_name, group in groups.items() if group_name not in children]
        if top_groups:
            specs.extend(top_groups)
        else:
            specs.extend(loaded["tasks"].values())
    return specs


def _is_task_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def _unknown_message(name: str, known: list[str], include_path: Path | None) -> str:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f" Close names: {', '.join(close)}." if close else ""
    where = (f"nor among the local tasks in {include_path}" if include_path
             else "and evaluate.harness.include_path (a folder of local task YAMLs) is not set")
    return (f"evaluate.harness.tasks: unknown task {name!r}: not a task, group or tag of lm-eval {HARNESS_VERSION}, "
            f"{where}.{hint} Task names are the harness's (`lm_eval ls tasks`), or those of local YAMLs "
            "(evaluation/harness_tasks/README.md). Built-in tasks fetch their datasets from the Hugging Face Hub "
            "unless local, and this pipeline is offline: a Hub task's dataset must already be in the local HF "
            "datasets cache.")


# --- results ------------------------------------------------------------------------------------------------------

def compact_results(raw: dict, config: dict) -> dict:
    """The compact, JSON-able form (module docstring) of what lm_eval.simple_evaluate returned."""
    tasks: dict[str, dict] = {}
    for section in ("results", "groups"):
        for task, entries in (raw.get(section) or {}).items():
            metrics = {}
            for key, value in entries.items():
                name = _metric_name(key)
                number = _number(value)
                if name is not None and number is not _SKIP:
                    metrics[name] = number
            tasks[task] = metrics
    n_samples = {task: int(counts["effective"]) for task, counts in (raw.get("n-samples") or {}).items()}
    higher_is_better = {task: {metric: bool(flag)
                               for metric, flag in flags.items() if flag is not None}
                        for task, flags in (raw.get("higher_is_better") or {}).items()}
    versions = {task: _plain(version) for task, version in (raw.get("versions") or {}).items()}
    n_shot = {task: _plain(shots) for task, shots in (raw.get("n-shot") or {}).items()}
    return {"harness_version": _version("lm-eval"), "tasks": tasks, "n_samples": n_samples,
            "higher_is_better": higher_is_better, "versions": versions, "n_shot": n_shot,
            "config": {**config, "groups": {group: list(children) for group, children in
                                            (raw.get("group_subtasks") or {}).items() if children}}}


_SKIP = object()


def _metric_name(key: str) -> str | None:
    """"acc,none" -> "acc", "acc_stderr,none" -> "acc_stderr", "exact_match,strict-match" ->
    "exact_match/strict-match"; None for entries that are not metrics ("alias", "name", "sample_len")."""
    if "," not in key:
        return None
    metric, _, filter_name = key.partition(",")
    return metric if filter_name == "none" else f"{metric}/{filter_name}"


def _number(value: Any) -> Any:
    """A float (numpy numbers included), None for NaN or infinity, _SKIP for anything else ("N/A", lists)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return _SKIP
    number = float(value)
    return number if math.isfinite(number) else None


def _plain(value: Any) -> Any:
    """A JSON-able version of a task version or shot count (numbers stay numbers, anything else becomes text)."""
    if isinstance(value, (int, float, str)) or value is None:
        return value
    return str(value)


def _is_stderr(metric: str) -> bool:
    return metric.partition("/")[0].endswith("_stderr")


def _empty_results(config: dict) -> dict:
    return {"harness_version": _version("lm-eval"), "tasks": {}, "n_samples": {}, "higher_is_better": {},
            "versions": {}, "n_shot": {}, "config": {**config, "groups": {}}}


def _version(distribution: str) -> str | None:
    try:
        return installed_version(distribution)
    except PackageNotFoundError:
        return None


def _check_harness_version() -> None:
    found = _version("lm-eval")
    if found != HARNESS_VERSION:
        raise PipelineError(f"lm-eval {found} is installed, the pipeline pins {HARNESS_VERSION} (task prompts and "
                            "metrics change between versions, so numbers would not be comparable): reinstall from "
                            "requirements.lock")


# --- GGUF through llama-cpp-python's server -----------------------------------------------------------------------

class HarnessUnsupported(PipelineError):
    """The harness cannot score this GGUF correctly through llama.cpp (the reason is the message)."""


def _check_adds_bos(gguf_path: Path) -> None:
    """Refuse a GGUF whose tokenizer adds no BOS token (module docstring: llama-cpp-python's echoed log-probabilities
    are then shifted by one token and the harness's scores are silently wrong)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.add_bos_token")
    except Exception as err:   # not a GGUF file: llama.cpp could not load it either
        raise PipelineError(f"harness on GGUF: cannot read {gguf_path} as a GGUF file ({err})") from err
    adds_bos = bool(field.contents()) if field is not None else False
    if not adds_bos:
        raise HarnessUnsupported(
            f"harness on GGUF: {gguf_path.name} adds no BOS token (tokenizer.ggml.add_bos_token is "
            f"{'false' if field is not None else 'not set'}). lm-eval's gguf model reads the prompt's log-"
            "probabilities that llama-cpp-python's server echoes, and for such a model those are shifted by one "
            "token (each is the next position's) and drop the answer's last token, so the scores would be wrong "
            "without any error. Run the harness on the HF model instead (run_harness: the base with the adapter, "
            "or the merged model).")


@contextlib.contextmanager
def llama_cpp_server(gguf_path: Path, timeout: float = SERVER_START_TIMEOUT_S):
    """`python -m llama_cpp.server` over `gguf_path` on a free loopback port, in its own process group; yields its
    base URL once /v1/models answers, and stops it on exit (SIGTERM, then SIGKILL), even when the body raised.
    Loopback requests bypass any HTTP proxy of the environment while it runs."""
    port = _free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path), "--host", SERVER_HOST,
               "--port", str(port), "--logits_all", "true", "--verbose", "false"]
    with tempfile.TemporaryDirectory(prefix="ftpipe-harness-gguf-") as folder:
        log = Path(folder) / "server.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        saved = {key: os.environ.get(key) for key in ("NO_PROXY", "no_proxy")}
        try:
            for key, value in saved.items():
                os.environ[key] = ",".join(filter(None, [value, SERVER_HOST, "localhost"]))
            base_url = f"http://{SERVER_HOST}:{port}"
            _wait_until_up(process, base_url, timeout, command, log)
            yield base_url
        finally:
            stop_process_group(process)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((SERVER_HOST, 0))
        return sock.getsockname()[1]


def _wait_until_up(process: subprocess.Popen, base_url: str, timeout: float, command: list[str], log: Path) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # loopback: never through a proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError):   # refused until uvicorn listens
            with opener.open(f"{base_url}/v1/models", timeout=5) as answer:
                if answer.status == 200:
                    return
        time.sleep(0.25)
    state = f"exited with {process.returncode}" if process.poll() is not None else f"not up after {timeout:.0f} s"
    raise PipelineError(f"harness on GGUF: llama-cpp-python's server {state}: {shlex.join(command)}\n"
                        f"its output ends:\n{log.read_text(errors='replace')[-3000:]}")
