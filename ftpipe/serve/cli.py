"""The options of `python -m ftpipe.serve`, its start (checks, then the startup message) and its stop.

Exit codes: 0 stopped by Ctrl-C or SIGTERM (requests in flight get a few seconds to finish); 2 a problem the
one-line message names (no release, an unknown --gguf type, a file llama.cpp cannot load, a port in use);
130 Ctrl-C before the server was up.
"""
from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import shlex
import signal
import socket
import sys
from pathlib import Path
from typing import NoReturn

from ftpipe.core.cli import positive_int, project_folder, run_command
from ftpipe.core.errors import PipelineError
from ftpipe.serve.release import REPORT_FILE, Served, choose, header

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
FALLBACK_N_CTX = 4096        # when the GGUF does not state its training context
MAX_DEFAULT_N_CTX = 32768    # a long-context model's full context would reserve gigabytes of KV cache by default
GRACEFUL_SHUTDOWN_S = 5      # how long requests in flight may finish after Ctrl-C or SIGTERM
EXAMPLE_PROMPT = "What does os.path.join do?"
WILDCARDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}   # all addresses -> this machine's loopback one

DESCRIPTION = """Serve a GGUF file of the release over an OpenAI-compatible HTTP API: llama-cpp-python's server
(/v1/chat/completions, /v1/completions, streaming) with the GGUF's own chat template, and /v1/models naming the
model, the license the pipeline concluded for it, its GGUF type and SHA-256."""
EPILOG = f"""Exit codes: 0 stopped by Ctrl-C or SIGTERM, 2 a problem the message names, 130 Ctrl-C while starting.
Example: python -m ftpipe.serve --gguf q8_0, then
  curl http://{DEFAULT_HOST}:{DEFAULT_PORT}/v1/models"""


def port_number(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 1 to 65535, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ftpipe.serve", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", metavar="TYPE|PATH",
                   help="a GGUF type of the release (f16, q8_0, q4_k_m, ...: models/release/gguf-TYPE/model-TYPE.gguf)"
                        " or a path to a .gguf file (default: the first GGUF of models/release/report.json)")
    p.add_argument("--project", type=project_folder, default=Path("."), metavar="DIR",
                   help="the project folder whose models/release/ is served (default: the current one)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default: {DEFAULT_HOST}: this machine only); 0.0.0.0 exposes the "
                        "server to the network: anyone who can reach this machine can use the model, with no "
                        "authentication")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                   help=f"port to listen on (default: {DEFAULT_PORT})")
    p.add_argument("--n-ctx", type=positive_int, metavar="TOKENS",
                   help="llama.cpp's context, prompt + answer, in tokens (default: the model's training context as "
                        f"the GGUF states it, at most {MAX_DEFAULT_N_CTX}; {FALLBACK_N_CTX} if it does not say)")
    p.add_argument("--threads", type=positive_int,
                   help=f"CPU threads llama.cpp computes with (default: all, {os.cpu_count()} here)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(run, parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from ftpipe.gguf.runtime import open_gguf
    from ftpipe.serve.app import build_app

    check_port(args.host, args.port)
    served = choose(args.gguf, args.project)
    n_ctx = args.n_ctx or min(header(served.path).get("context_length") or FALLBACK_N_CTX, MAX_DEFAULT_N_CTX)
    threads = args.threads or os.cpu_count() or 1
    # A file llama.cpp cannot load fails here, with llama.cpp's own words, not inside uvicorn.
    open_gguf(served.path, n_ctx, n_threads=threads).close()
    app = build_app(served, n_ctx, threads)
    print(startup_message(served, args.host, args.port, n_ctx, threads, args.project), file=sys.stderr, flush=True)
    serve(app, args.host, args.port)
    print("ftpipe.serve: stopped", file=sys.stderr)
    return 0


def exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's finalization (`python -m ftpipe.serve` ends so). A request the
    graceful shutdown cancelled can still be generating in a worker thread (a llama.cpp call cannot be interrupted),
    and freeing the model under it, or at finalization after ftpipe.gguf.runtime's log callback is gone, crashes
    the process (SIGSEGV). The OS frees the model's memory and file mapping at once; the server writes no files."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def check_port(host: str, port: int) -> None:
    """Fail before loading anything when the address cannot be listened on (a port in use, an unknown host)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET   # as uvicorn chooses
    try:
        with socket.create_server((host, port), family=family):   # with SO_REUSEADDR, as uvicorn binds
            pass
    except OSError as error:
        hint = ("another program listens there: choose another --port" if error.errno == errno.EADDRINUSE else
                "--host must be an address of this machine")
        raise PipelineError(f"cannot listen on {host} port {port}: {error.strerror or error}: {hint}") from error


class Stopped(Exception):
    """SIGTERM, once uvicorn has shut down gracefully (it hands the signal back to the previous handler)."""


def serve(app, host: str, port: int) -> None:
    """Run uvicorn until Ctrl-C or SIGTERM: uvicorn stops taking requests, gives those in flight
    GRACEFUL_SHUTDOWN_S seconds, then raises the signal again, which ends here."""
    import uvicorn

    def stopped(signum, frame):
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info",
                                      timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)).run()
    except (KeyboardInterrupt, Stopped):
        pass
    except SystemExit as error:   # uvicorn's way out when it cannot bind after all (it logged why)
        raise PipelineError(f"uvicorn could not serve on {host} port {port} (exit {error.code}): see above") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def base_url(host: str, port: int) -> str:
    """The URL a client on this machine uses: a wildcard address is reached through the loopback one."""
    shown = WILDCARDS.get(host, host)
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def startup_message(served: Served, host: str, port: int, n_ctx: int, threads: int, project: Path) -> str:
    url = base_url(host, port)
    request = {"model": served.model_id, "messages": [{"role": "user", "content": EXAMPLE_PROMPT}],
               "temperature": 0}
    curl = (f"curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
            f"-d {shlex.quote(json.dumps(request))}")
    if served.released:
        license_line = f"{served.license} (concluded by the pipeline: {project / REPORT_FILE})"
    else:
        license_line = f"{served.license} ({served.note})"
    if is_loopback(host):
        reach = "from this machine only (--host 0.0.0.0 exposes it to the network)"
    elif host in WILDCARDS:
        reach = "from the network: anyone who can reach this machine can use the model (no authentication)"
    else:
        reach = f"by anyone who can reach {host} (no authentication)"
    return "\n".join([
        f"ftpipe.serve: OpenAI-compatible API at {url}/v1 (listening on {host} port {port})",
        f"  model    {served.model_id}",
        f"  file     {served.path} ({served.gguf_type or 'unknown type'}, sha256 {served.sha256})",
        f"  license  {license_line}",
        f"  llama.cpp context {n_ctx} tokens, {threads} threads; reachable {reach}",
        f"  try:     {curl}",
        "Ctrl-C stops it.",
    ])
