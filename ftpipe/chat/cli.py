"""The options of `python -m ftpipe.chat`, and its exit codes: 0 fine; 2 a problem the one-line message names (a
missing model, an unknown --model value, a file llama.cpp cannot load); 130 Ctrl-C."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
from pathlib import Path
from typing import Iterator

from ftpipe.chat.backends import DEFAULT_N_CTX, Sampling, load
from ftpipe.chat.models import VALID, resolve
from ftpipe.chat.session import COMMANDS, Chat, interactive, turn
from ftpipe.core.cli import positive_int, project_folder, run_command
from ftpipe.core.errors import PipelineError

EPILOG = "\n".join([*textwrap.wrap(f"--model and --tuned take {VALID}."), "",
                    *textwrap.wrap(f"Interactive commands: {COMMANDS}."), "",
                    "Exit codes: 0 fine, 2 a problem the message names, 130 interrupted."])


def temperature(text: str) -> float:
    value = float(text)
    if not value >= 0:   # also rejects nan
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or more, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ftpipe.chat", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Chat in the terminal with the models of the last pipeline run.")
    p.add_argument("--model", help="what to talk to (default: merged)")
    p.add_argument("--prompt", help="answer this one prompt on stdout, then exit (no interactive chat)")
    p.add_argument("--side-by-side", action="store_true",
                   help="answer each prompt with the base model and with the tuned model (--tuned)")
    p.add_argument("--tuned", default="merged", help="the tuned model of --side-by-side (default: merged)")
    p.add_argument("--system", help="a system message at the start of the conversation")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="answer length limit (default: 256)")
    p.add_argument("--temperature", type=temperature, default=0.0,
                   help="0 (default): greedy, the answer the pipeline's checks and the server give; >0: sample")
    p.add_argument("--seed", type=int, help="sampling seed: the same seed and conversation give the same answer")
    p.add_argument("--n-ctx", type=positive_int, default=DEFAULT_N_CTX,
                   help=f"llama.cpp context of a GGUF, prompt + answer, in tokens (default: {DEFAULT_N_CTX})")
    p.add_argument("--project", type=project_folder, default=Path("."),
                   help="the project folder whose models/ and params.yaml are used (default: the current one)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(run, parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if args.side_by_side:
        if args.model is not None:
            raise PipelineError("--side-by-side compares the base model with --tuned: use --tuned, not --model")
        specs = [("base", resolve("base", args.project)), (f"tuned ({args.tuned})", resolve(args.tuned, args.project))]
    else:
        specs = [(None, resolve(args.model or "merged", args.project))]
    with stdout_to_stderr():   # loading messages must never mix with an answer on stdout
        chats = [Chat(label, load(spec, args.n_ctx), args.system) for label, spec in specs]
    sampling = Sampling(args.max_new_tokens, args.temperature, args.seed)
    if args.prompt is not None:
        turn(chats, args.prompt, sampling, sys.stdout)
        return 0
    described = " vs ".join(f"{label or spec.label}: {spec.location()} ({chat.backend.description})"
                            for (label, spec), chat in zip(specs, chats))
    print(f"ftpipe chat with {described}. {COMMANDS}.", file=sys.stderr)
    return interactive(chats, sampling)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send stdout to stderr, for Python's prints and for native libraries writing to file descriptor 1."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
