"""Audit the MLflow record of the pipeline: what produced a run or a file, and does the run reproduce.

    python -m ftpipe.audit provenance RUN_ID [--json]         # a pipeline run, or one of its stage runs
    python -m ftpipe.audit provenance --file PATH [--json]    # the run that produced this file
    python -m ftpipe.audit reproduce RUN_ID [--workdir DIR] [--rtol X] [--atol X] [--keep]
    python -m ftpipe.audit upload-pending [FOLDER]            # = python -m ftpipe.tracking.pending (mlflow-pending/)

This module is the command line only. `provenance` prints the chain a reviewer needs: the pipeline run
and its git commit; per stage (in dvc.yaml order) whether it executed or was skipped (and which run
produced its outputs), its params, its result metrics, its input data sets and its dvc.lock hashes; the
data sources with their licenses and SHA-256, the base model and the environment (collected and
formatted by ftpipe.audit.provenance_chain). `reproduce` reruns the run from its commit and params.yaml in a
fresh git worktree with `dvc repro --force` and compares every result metric (ftpipe.audit.reproduce).

Exit codes: 0 fine; 2 a problem the message names and says how to fix; 3 reproduce: metrics differ.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ftpipe  # noqa: F401 - offline, telemetry-free environment first
from ftpipe.audit.provenance_chain import (
    collect_provenance,
    find_producers,
    format_matches,
    format_provenance,
    open_store,
    pipeline_run_of,
)
from ftpipe.audit.reproduce import format_reproduction, reproduce
from ftpipe.core.errors import PipelineError, run_stage
from ftpipe.core.paths import PARAMS_FILE
from ftpipe.tracking.runs import project_root, tracking_uri

MISMATCH_EXIT = 3


# --- the command line ----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ftpipe.audit", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prov = commands.add_parser("provenance", help="the chain that produced a run, or a file")
    prov.add_argument("run_id", nargs="?", help="a pipeline run id, or a stage run id (its pipeline run is shown)")
    prov.add_argument("--file", type=Path, help="show the run whose outputs hold this file's content instead")
    prov.add_argument("--json", action="store_true", help="print machine-readable JSON")
    rep = commands.add_parser("reproduce", help="rerun a pipeline run from its commit and params; compare metrics")
    rep.add_argument("run_id")
    rep.add_argument("--workdir", type=Path, help="where the worktree, repro.log and report.json go (default: a new "
                                                  "temporary folder)")
    rep.add_argument("--rtol", type=float,
                     help="relative tolerance (default: params.yaml reproduce.relative_tolerance)")
    rep.add_argument("--atol", type=float,
                     help="absolute tolerance (default: params.yaml reproduce.absolute_tolerance)")
    rep.add_argument("--keep", action="store_true", help="keep the worktree afterwards")
    commands.add_parser("upload-pending",
                        help="log what stages kept in mlflow-pending/ (python -m ftpipe.tracking.pending)")
    args = parser.parse_args(argv)
    if args.command == "provenance" and (args.run_id is None) == (args.file is None):
        parser.error("provenance takes a RUN_ID or --file PATH (one of them)")
    if args.command == "reproduce" and any(value is not None and value < 0 for value in (args.rtol, args.atol)):
        parser.error("--rtol and --atol must be >= 0")
    return args


def provenance_command(args: argparse.Namespace) -> None:
    client, _ = open_store()
    found = None
    if args.file:
        found = find_producers(client, args.file, project_root() / ".dvc" / "cache")
        if not found["matches"]:
            raise PipelineError(
                f"{args.file}: no stage run in {tracking_uri()} produced this content (sha256 {found['sha256']}, "
                f"md5 {found['md5']}; {found['stage_runs_checked']} stage runs checked against their dvc.lock "
                "outputs and logged artifacts). Was it made by `dvc repro` with this store, and is .dvc/cache the "
                "one it was made with (folder outputs are matched through it)?")
        args.run_id = found["matches"][0]["run_id"]
    report = collect_provenance(client, pipeline_run_of(client, args.run_id))
    if args.json:
        print(json.dumps({"file": found, **report} if found else report, indent=2, default=str))
    else:
        print((format_matches(found) + "\n\n" if found else "") + format_provenance(report))


def reproduce_command(args: argparse.Namespace) -> None:
    from ftpipe.core.params import load_params

    defaults = load_params(project_root() / PARAMS_FILE).reproduce
    tolerance = {"relative": defaults.relative_tolerance if args.rtol is None else args.rtol,
                 "absolute": defaults.absolute_tolerance if args.atol is None else args.atol}
    report = reproduce(args.run_id, args.workdir, tolerance, args.keep)
    print(format_reproduction(report))
    if not report["agree"]:
        sys.exit(MISMATCH_EXIT)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # ftpipe.tracking.pending's own command line, under the name tracking's warnings give
    if argv[:1] == ["upload-pending"]:
        from ftpipe.tracking import pending

        sys.exit(pending.main(argv[1:]))
    args = parse_args(argv)
    {"provenance": provenance_command, "reproduce": reproduce_command}[args.command](args)


if __name__ == "__main__":
    run_stage(main)
