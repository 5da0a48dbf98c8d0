"""llama-cpp-python's server app (llama_cpp.server.app.create_app) over one GGUF file, with its routes as they are
except two things:

- GET /v1/models answers our own entry: the model id, the concluded license, the GGUF type and the file's SHA-256
  (ftpipe.serve.release.Served.model_entry), in the same OpenAI list shape;
- a request to /v1/chat/completions or /v1/completions that leaves repeat_penalty out gets llama-cpp-python's own
  default (1.0, what Llama.create_chat_completion uses) instead of the 1.1 its server's request models default to:
  with temperature 0 the answer is then the greedy answer the quantize stage's checks and `python -m ftpipe.chat`
  give. One that leaves model out gets the model id, so the answer names the model, not the file's local path.
  A request that sets either keeps its value.
"""
from __future__ import annotations

import json
import os
from typing import Any

from ftpipe.core.errors import PipelineError
from ftpipe.gguf.runtime import GGUF_CHAT_FORMAT
from ftpipe.serve.release import Served

MODELS_PATH = "/v1/models"
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
LIBRARY_DEFAULTS = {"repeat_penalty": 1.0}   # llama_cpp.Llama's; llama_cpp.server.types says 1.1


def build_app(served: Served, n_ctx: int, threads: int):
    """The FastAPI app, with the model loaded (a load failure is a PipelineError naming the file)."""
    import llama_cpp.server.app as server
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    # llama-cpp-python's settings also read environment variables; CONFIG_FILE would replace all of ours.
    os.environ.pop("CONFIG_FILE", None)
    model = ModelSettings(model=str(served.path), model_alias=served.model_id, chat_format=GGUF_CHAT_FORMAT,
                          n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                          logits_all=False,   # as open_gguf: the server's True costs n_ctx x vocabulary floats
                          use_mlock=False, verbose=False)
    replace_models_route(server.router, served.model_entry())
    try:
        app = server.create_app(server_settings=ServerSettings(), model_settings=[model])
    except (ValueError, RuntimeError) as error:
        raise PipelineError(f"{served.path}: llama.cpp cannot load this GGUF in the server: {error}") from error
    app.add_middleware(RequestDefaults, defaults={**LIBRARY_DEFAULTS, "model": served.model_id})
    return app


def replace_models_route(router, entry: dict[str, Any]) -> None:
    """Swap GET /v1/models in llama-cpp-python's APIRouter (llama_cpp.server.app.router, which create_app
    includes) for one answering `entry`, keeping its route class (OpenAI-style errors), tags and dependencies (the
    API key check). The router is a module global, changed before create_app includes it (one app per process):
    the FastAPI installed here (0.165) includes a router by reference, so the app's own route list holds no
    /v1/models route to replace afterwards."""
    from fastapi.routing import APIRoute

    found = [route for route in router.routes if isinstance(route, APIRoute) and route.path == MODELS_PATH]
    if len(found) != 1:
        raise PipelineError(f"llama-cpp-python's server has {len(found)} {MODELS_PATH} routes, not 1: this version "
                            "is not the one ftpipe.serve was written for (pyproject.toml pins it)")
    original = found[0]
    router.routes.remove(original)

    async def get_models() -> dict[str, Any]:
        return {"object": "list", "data": [dict(entry)]}

    router.add_api_route(MODELS_PATH, get_models, methods=["GET"], summary=original.summary, tags=original.tags,
                         dependencies=original.dependencies, route_class_override=type(original))


class RequestDefaults:
    """ASGI middleware: adds `defaults` to a JSON request body of GENERATION_PATHS that leaves them out."""

    def __init__(self, app, defaults: dict[str, Any]):
        self.app, self.defaults = app, defaults

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":   # the client left: let the app see it
                await self.app(scope, _replay([message], receive), send)
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            payload = json.loads(body)
        except ValueError:   # not JSON: the app answers it as it would
            payload = None
        if isinstance(payload, dict) and any(key not in payload for key in self.defaults):
            body = json.dumps({**self.defaults, **payload}).encode()
            headers = [(name, value) for name, value in scope["headers"] if name.lower() != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)


def _replay(messages: list[dict], receive):
    """An ASGI receive that gives `messages` first, then the real receive's."""
    pending = list(messages)

    async def replayed():
        return pending.pop(0) if pending else await receive()

    return replayed
