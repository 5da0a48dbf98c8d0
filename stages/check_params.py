"""Stage `check_params` (first in the DAG): params.yaml is read and validated before any stage runs.

    python -m stages.check_params

DVC deletes a stage's outputs before it runs the stage's command, and checks that the params keys a
stage lists exist only when it reaches that stage: a misspelt `train.learnig_rate` used to fail with
DVC's own "Parameters ... are missing" after the trained adapter was already gone. Every stage
depends on this stage's `gate.json`, so DVC runs it first; a bad params.yaml fails here with the
did-you-mean message of ftpipe.core.params, before any output is touched. It also checks that every key
dvc.yaml lists exists in params.yaml, whenever params.yaml changes (DVC takes no dvc.yaml as a dependency).

`gate.json` holds no value of params.yaml: it is the same bytes after every valid edit, so this stage
reruns on every change of params.yaml and nothing reruns because of it.
"""
from __future__ import annotations

from pathlib import Path

import yaml

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.core.errors import PipelineError, run_stage
from ftpipe.core.io import write_json
from ftpipe.core.params import Params, ParamsError, flatten, load_params
from ftpipe.core.paths import CHECKED_PARAMS_DIR, DVC_YAML, PARAMS_FILE
from ftpipe.core.stage import Stage

GATE_FILE = "gate.json"


def missing_listed_keys(dvc_yaml: dict, params_raw: dict) -> list[str]:
    """'stage: key' for every params key dvc.yaml lists that params.yaml lacks."""
    missing = []
    for name, stage in (dvc_yaml.get("stages") or {}).items():
        for key in stage.get("params") or []:
            if isinstance(key, dict):   # `- other.yaml: [keys]`: another params file, not ours to check
                continue
            node: object = params_raw
            for part in str(key).split("."):
                if isinstance(node, dict) and part in node:
                    node = node[part]
                elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                    node = node[int(part)]
                else:
                    missing.append(f"{name}: {key}")
                    break
    return missing


def check(params_file: Path, dvc_yaml_file: Path) -> Params:
    """The validated params; a ParamsError naming the key (and the close match) otherwise."""
    params = load_params(params_file)
    if dvc_yaml_file.exists():
        missing = missing_listed_keys(yaml.safe_load(dvc_yaml_file.read_text(encoding="utf-8")) or {},
                                      yaml.safe_load(params_file.read_text(encoding="utf-8")))
        if missing:
            raise ParamsError(f"{dvc_yaml_file} lists params keys that {params_file} lacks: {', '.join(missing)}. Add "
                              f"them to {params_file}, or remove them from the stage's `params:` in {dvc_yaml_file}.")
    return params


def tracked_params(params: Params) -> dict:
    """None listed in dvc.yaml: the stage depends on the whole params.yaml file."""
    return {}


def main() -> None:
    try:
        params = check(PARAMS_FILE, DVC_YAML)
    except PipelineError as err:
        raise PipelineError(f"{err}\nNo stage ran and no output was touched.") from err
    keys = len(flatten(params))
    with Stage("check_params", tracked_params) as stage:
        with stage.output() as out_dir:
            write_json(out_dir / GATE_FILE, {"params_file": str(PARAMS_FILE), "valid": True})
            stage.record["keys_checked"] = keys
        stage.finish({"valid": True, "keys": keys}, log={"keys": keys})
    print(f"check_params: {PARAMS_FILE} is valid ({keys} keys) -> {CHECKED_PARAMS_DIR}/{GATE_FILE}")


if __name__ == "__main__":
    run_stage(main)
