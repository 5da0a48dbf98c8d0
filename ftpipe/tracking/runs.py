"""The MLflow record of the pipeline: one parent run per `dvc repro` (or `dvc exp run`), one child
run per stage it executed. Imported lazily and never fatal.

Grouping. DVC runs each stage as its own process and has no hook around a whole `dvc repro`. So a
stage finds its invocation through its `dvc` ancestor process (host, pid, start time): the first
stage to run creates the parent run, the next ones join it, and the `record` stage (always last,
always run; stages/record.py) closes it, records the stages DVC skipped and names it after what
changed.

Failures. When the store is unavailable, or fails part way (disk full, locked, removed), the stage
goes on, warns once, and writes every operation that did not reach the store to
`mlflow-pending/<stage>-<time>.json`; `python -m ftpipe.audit upload-pending` replays them later.
The GPU machine has no MLflow at all: there every stage keeps its whole record that way.

Concurrency. Several pipelines may share one store: run creation is serialized by a file lock next
to the store (two processes creating a fresh SQLite schema at once would collide); after that,
SQLite's own busy timeout (20 s in MLflow) orders the writes.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from ftpipe.core.io import atomic_write_text, file_hashes, sha256_file, tree_digest
from ftpipe.core.provenance import environment, git_state, pip_freeze, utc_now
from ftpipe.tracking.system_metrics import SystemMetricsSampler

PENDING_DIR = Path("mlflow-pending")
DEFAULT_EXPERIMENT = "ftpipe"
# tags that tie runs together (MLflow's UI shows them; search_runs filters on them)
KIND = "ftpipe.kind"                 # "pipeline" (one per dvc invocation) or "stage"
INVOCATION = "ftpipe.invocation"     # host:pid:start-time of the dvc process
STAGE = "ftpipe.stage"
PARENT = "mlflow.parentRunId"        # MLflow's own nesting tag: the UI groups children under it
RUN_NAME = "mlflow.runName"
RUNNING_NAME = "dvc repro (running)"
# timing and memory metrics are measurements of the machine, not results: never compared on reproduce
MEASUREMENTS = ("seconds", "per_s", "peak_memory", "mfu", "_time", "system/")
PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 1000   # MLflow's limits for one log_batch call


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri() -> str:
    """The MLflow store: $MLFLOW_TRACKING_URI, else a SQLite file at the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)


# Where the exceptions of an unavailable or failing store come from (MLflow, its database and HTTP layers);
# anything else raised while recording is a bug of ours, and must not be reported as "MLflow unavailable".
STORE_ERROR_MODULES = ("mlflow", "sqlalchemy", "sqlite3", "alembic", "requests", "urllib3", "http")


def store_failure(err: BaseException) -> bool:
    """Did `err` come from the tracking store (unreachable, locked, full, refused), not from our code?"""
    if isinstance(err, (OSError, ConnectionError, TimeoutError)):
        return True
    return any(cls.__module__.split(".")[0] in STORE_ERROR_MODULES for cls in type(err).__mro__)


def is_measurement(metric: str) -> bool:
    return any(part in metric for part in MEASUREMENTS)


# --- which pipeline invocation this process belongs to ---------------------------------------------

def _is_dvc(command: list[str]) -> bool:
    head = [Path(arg).name for arg in command[:3]]
    return bool(head) and (head[0] == "dvc" or (len(head) > 1 and head[1] == "dvc")
                           or head[1:3] == ["-m", "dvc"])


def invocation_key() -> str:
    """The `dvc repro` / `dvc exp run` this process runs under: $FTPIPE_INVOCATION, else the nearest
    `dvc` ancestor process, else this process alone (a stage run by hand)."""
    if os.environ.get("FTPIPE_INVOCATION"):
        return os.environ["FTPIPE_INVOCATION"]
    host = socket.gethostname()
    try:
        import psutil

        me = psutil.Process()
        for ancestor in me.parents():
            with contextlib.suppress(psutil.Error):
                if _is_dvc(ancestor.cmdline()):
                    return f"{host}:{ancestor.pid}:{int(ancestor.create_time())}"
        return f"{host}:{me.pid}:{int(me.create_time())}"
    except ImportError:
        return f"{host}:{os.getpid()}:{int(time.time())}"


# --- the store ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serializes run creation between processes sharing a store (a lock file beside a SQLite store,
    else at the project root)."""
    import fcntl

    path = Path(uri[len("sqlite:///"):] + ".lock") if uri.startswith("sqlite:///") else project_root() / ".mlflow.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def connect():
    """(mlflow module, client, experiment id) for the project's store; creates the experiment."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):
        client = MlflowClient(uri)   # builds the store, a fresh SQLite schema included: under the lock
        experiment = client.get_experiment_by_name(experiment_name())
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            experiment_name(), artifact_location=(project_root() / "mlartifacts").as_uri())
    return mlflow, client, experiment_id


def pipeline_run_id(client, experiment_id: str, invocation: str, create: bool = True) -> str | None:
    """The parent run of this invocation: found by its tag, or created (by the first stage to run)."""
    with store_lock(tracking_uri()):
        found = client.search_runs([experiment_id],
                                   f"tags.`{KIND}` = 'pipeline' and tags.`{INVOCATION}` = '{invocation}'",
                                   max_results=1)
        if found or not create:
            return found[0].info.run_id if found else None
        reconcile_dead_runs(client, experiment_id)
        git = git_state()
        tags = {KIND: "pipeline", INVOCATION: invocation, "git.commit": str(git["commit"]),
                "git.dirty": str(git["dirty"])}
        if os.environ.get("DVC_EXP_NAME"):
            tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
        if os.environ.get("FTPIPE_REPRODUCES"):
            tags["ftpipe.reproduces"] = os.environ["FTPIPE_REPRODUCES"]
        return client.create_run(experiment_id, run_name=RUNNING_NAME, tags=tags).info.run_id


def invocation_alive(invocation: str) -> bool | None:
    """Is the process of an invocation key (host:pid:start time) still running? None: another host's."""
    host, _, rest = invocation.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        import psutil

        return abs(psutil.Process(int(pid)).create_time() - float(started or 0)) < 2
    except ImportError:
        return None
    except (psutil.Error, ValueError):
        return False


def reconcile_dead_runs(client, experiment_id: str) -> list[str]:
    """Runs left RUNNING by an invocation whose process is gone (killed with SIGKILL, the machine restarted:
    no Python cleanup ran) are ended as KILLED, saying so, by the next invocation on the same host. Runs of
    other hosts are left alone: their process cannot be seen from here. Returns the ids ended."""
    ended = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        invocation = run.data.tags.get(INVOCATION, "")
        if run.data.tags.get(KIND) and invocation_alive(invocation) is False:
            client.set_tag(run.info.run_id, "ftpipe.ended_by",
                           f"the next invocation ({invocation_key()}): the process of {invocation} was gone")
            if run.data.tags.get(KIND) == "pipeline":
                client.set_tag(run.info.run_id, RUN_NAME, f"killed ({run.info.run_name})"[:250])
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    if ended:
        print(f"MLflow: ended {len(ended)} run(s) left RUNNING by a killed invocation as KILLED", file=sys.stderr)
    return ended


def mark_failed(client, pipeline_run: str, stage: str) -> None:
    client.set_tag(pipeline_run, RUN_NAME, f"failed at {stage}")
    client.set_terminated(pipeline_run, "FAILED")


def environment_tags(env: dict[str, Any]) -> dict[str, str]:
    """The environment pins worth filtering and comparing runs on, as `env.*` tags (the full
    `pip freeze` and environment.json are artifacts of every stage run)."""
    tags = {"env.python": env["python"], "env.os": env["platform"], "env.cpu": env["processor"],
            "env.cpu_count": str(env["cpu_count"]), "env.cpu_flags": " ".join(env.get("cpu_flags", []))}
    tags.update({f"env.{name}": version for name, version in env["packages"].items()})
    if env.get("torch_cuda"):
        tags["env.torch_cuda"] = env["torch_cuda"]
    if env.get("llama_cpp", {}).get("llama_cpp_commit"):   # which llama.cpp, built how: its version alone does not say
        tags["env.llama_cpp_commit"] = env["llama_cpp"]["llama_cpp_commit"]
        tags["env.llama_cpp_cmake_args"] = env["llama_cpp"].get("cmake_args") or ""
    if env.get("gpu"):
        gpu = env["gpu"]
        tags.update({"env.gpu": gpu["name"], "env.gpu_memory_gib": str(gpu["memory_gib"]),
                     "env.gpu_count": str(gpu["count"]), "env.nvidia_driver": str(gpu["driver"])})
    return tags


# --- one stage's run --------------------------------------------------------------------------------------

class StageTracker:
    """The MLflow run of one executed stage. Every logging call is an operation; the ones that do not
    reach the store are kept, in order, for upload-pending."""

    def __init__(self, stage: str, params: dict[str, Any], system_metrics_interval_s: float | None = None):
        self.stage = stage
        self.params = params
        self.sampler = (SystemMetricsSampler(system_metrics_interval_s,
                                             lambda metrics, step: self.log_metrics(metrics, step))
                        if system_metrics_interval_s else None)
        self.invocation = invocation_key()
        self.tags: dict[str, str] = {}
        self.pending: list[dict[str, Any]] = []
        self.lock = threading.Lock()   # the sampler thread logs too: one operation at a time, in order
        self.client = None
        self.run_id = self.parent_id = self.experiment_id = None
        self.warned = False
        self.started_at = utc_now()

    # lifecycle
    def start(self) -> None:
        git = git_state()
        env = environment()
        self.tags = {KIND: "stage", STAGE: self.stage, INVOCATION: self.invocation, RUN_NAME: self.stage,
                     "dvc.stage": os.environ.get("DVC_STAGE", self.stage), "git.commit": str(git["commit"]),
                     "git.dirty": str(git["dirty"]), **environment_tags(env)}
        if os.environ.get("DVC_EXP_NAME"):
            self.tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
        try:
            _, client, experiment_id = connect()
            self.experiment_id = experiment_id
            self.parent_id = pipeline_run_id(client, experiment_id, self.invocation)
            self.run_id = client.create_run(experiment_id, run_name=self.stage,
                                            tags={**self.tags, PARENT: self.parent_id}).info.run_id
            self.client = client
        except Exception as err:  # noqa: BLE001 - tracking must never break a stage
            self._fail(err, "MLflow unavailable")
        self.log_params(self.params)
        self.log_dict(env, "environment/environment.json")
        self.log_text("\n".join(pip_freeze()) + "\n", "environment/pip-freeze.txt")
        if self.sampler:
            self.sampler.start()

    def end(self, status: str) -> None:
        if self.sampler:
            self.sampler.stop()
        if "torch" in sys.modules and not self.tags.get("env.torch_cuda"):
            # torch is imported lazily, mostly after start(): describe CUDA and the GPU now that it is loaded
            env = environment()
            if env.get("torch_cuda"):
                self.set_tags({k: v for k, v in environment_tags(env).items() if self.tags.get(k) != v})
                self.log_dict(env, "environment/environment.json")
        self._do({"op": "end", "status": status})
        if status != "FINISHED" and self.parent_id:   # dvc stops here: the record stage will not run
            self._do({"op": "parent_failed", "parent_id": self.parent_id, "stage": self.stage})
        if self.pending:
            PENDING_DIR.mkdir(exist_ok=True)
            path = PENDING_DIR / f"{self.stage}-{utc_now().replace(':', '')}-{os.getpid()}.json"
            atomic_write_text(path, json.dumps({
                "stage": self.stage, "invocation": self.invocation, "run_id": self.run_id, "parent_id": self.parent_id,
                "tags": self.tags, "status": status, "started_at": self.started_at, "ended_at": utc_now(),
                "ops": self.pending}, indent=2, default=str) + "\n")
            print(f"warning: {len(self.pending)} MLflow operations of stage {self.stage} kept in {path}; "
                  f"upload them with `python -m ftpipe.audit upload-pending`", file=sys.stderr)

    def reference(self) -> dict[str, Any]:
        """Where this stage's record is, for the provenance.json of its outputs (the report links it): ids are
        null when MLflow was unavailable (the record is then in mlflow-pending/)."""
        return {"tracking_uri": tracking_uri() if self.run_id else None, "experiment_id": self.experiment_id,
                "run_id": self.run_id, "pipeline_run_id": self.parent_id}

    # logging
    def log_params(self, params: dict[str, Any]) -> None:
        self._do({"op": "params", "params": params})

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numeric:
            now = int(time.time() * 1000)   # kept with a pending op: a replayed point keeps its real time
            self._do({"op": "metrics", "step": step, "metrics": numeric, "timestamp": now})

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        path = Path(path)
        self._do({"op": "artifact", "path": str(path.resolve()), "folder": folder, "sha256": content_digest(path)})

    def log_reference(self, path: Path, artifact_file: str) -> None:
        """A file too large to copy into the store: its path, size and SHA-256 instead."""
        path = Path(path)
        self.log_dict({"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": sha256_file(path)},
                      artifact_file)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self._do({"op": "dict", "data": data, "artifact_file": artifact_file})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._do({"op": "text", "text": text, "artifact_file": artifact_file})

    def log_input(self, path: Path, name: str, context: str) -> None:
        """A data set as an MLflow input: its SHA-256 (MLflow keeps 32 hex digits as the digest; the
        full one is a tag), rows and location."""
        path = Path(path)
        digest = content_digest(path)
        tags = {"sha256": digest, "path": str(path)}
        if path.suffix == ".jsonl":
            with open(path, "rb") as handle:
                tags["rows"] = str(sum(1 for line in handle if line.strip()))
        self._do({"op": "input", "path": str(path.resolve()), "name": name, "context": context, "tags": tags})

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)
        self._do({"op": "tags", "tags": tags})

    # plumbing
    def _do(self, op: dict[str, Any]) -> None:
        with self.lock:
            if self.client is None:
                self.pending.append(op)
                return
            try:
                apply_op(self.client, self.run_id, op)
            except Exception as err:  # noqa: BLE001
                self.pending.append(op)
                self._fail(err, "MLflow logging failed")

    def _fail(self, err: Exception, what: str) -> None:
        if not self.warned:
            print(f"warning: {what} ({type(err).__name__}: {str(err)[:300]}); the stage goes on and keeps "
                  f"what it could not log in {PENDING_DIR}/", file=sys.stderr)
            self.warned = True
        if self.client is not None and self.run_id:
            with contextlib.suppress(Exception):
                self.client.set_terminated(self.run_id, "FAILED")
        self.client = None


# --- operations on a run: what a stage does live, and what upload-pending replays ------------------------

def apply_op(client, run_id: str, op: dict[str, Any]) -> None:
    """Perform one recorded operation on a run (through the client, naming the run: the sampler
    thread logs too, and MLflow's fluent API keeps its active run per thread)."""
    from mlflow.entities import RunTag

    kind = op["op"]
    if kind == "params":
        log_batch(client, run_id, params=op["params"])
    elif kind == "metrics":
        log_batch(client, run_id, metrics=metric_points(op["metrics"], op["timestamp"], op["step"]))
    elif kind == "artifact":
        path = Path(op["path"])
        if path.is_dir():
            client.log_artifacts(run_id, str(path), op["folder"] or path.name)
        else:
            client.log_artifact(run_id, str(path), op["folder"])
    elif kind == "dict":
        client.log_dict(run_id, op["data"], op["artifact_file"])
    elif kind == "text":
        client.log_text(run_id, op["text"], op["artifact_file"])
    elif kind == "input":
        log_dataset_input(client, run_id, op)
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in op["tags"].items()])
    elif kind == "end":
        client.set_terminated(run_id, op["status"], end_time=op.get("end_time"))
    elif kind == "parent_failed":
        mark_failed(client, op["parent_id"], op["stage"])
    else:   # written by a newer ftpipe: the caller keeps it rather than lose it
        raise ValueError(f"unknown MLflow operation {kind!r}")


def metric_points(metrics: dict[str, float], timestamp_ms: int, step: int | None) -> list:
    from mlflow.entities import Metric

    return [Metric(key, float(value), timestamp_ms, step or 0) for key, value in metrics.items()]


def log_batch(client, run_id: str, params: dict[str, Any] | None = None, metrics: list | None = None) -> None:
    """Params (any values: shortened to MLflow's limit) and metric points, in as many log_batch calls
    as MLflow's per-call limits need."""
    from mlflow.entities import Param

    param_list = [Param(key, short_param(value)) for key, value in (params or {}).items()]
    for start in range(0, len(param_list), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=param_list[start:start + PARAMS_PER_BATCH])
    for start in range(0, len(metrics or []), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + METRICS_PER_BATCH])


def log_dataset_input(client, run_id: str, op: dict[str, Any]) -> None:
    """A data set as the stage saw it: its recorded digest, whatever the file holds now."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = dataset_input(Path(op["path"]), op["name"], op["tags"]["sha256"])
    tags = [InputTag(key, str(value)) for key, value in op["tags"].items()]
    if op.get("context"):
        tags.append(InputTag(MLFLOW_DATASET_CONTEXT, op["context"]))
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])


def content_digest(path: Path) -> str:
    """SHA-256 of a file, or of a folder's sorted (relative path, SHA-256) listing."""
    return tree_digest(file_hashes(path)) if path.is_dir() else sha256_file(path)


def dataset_input(path: Path, name: str, digest: str):
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    return MetaDataset(LocalArtifactDatasetSource(str(path.resolve())), name=name, digest=digest[:32])


def short_param(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 6000 else text[:5997] + "..."   # MLflow caps a param value at 6000 chars


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any], system_metrics_interval_s: float | None = None
              ) -> Iterator[StageTracker]:
    """One MLflow run for one executed stage, closed FAILED (with its pipeline run) if the stage raises.
    With `system_metrics_interval_s`, CPU, memory and GPU use are sampled at that interval
    (ftpipe/tracking/system_metrics.py)."""
    tracker = StageTracker(stage, params, system_metrics_interval_s)
    tracker.start()
    try:
        yield tracker
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
