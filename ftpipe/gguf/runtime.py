"""llama.cpp (through llama-cpp-python) as the runtime a GGUF is checked and served in.

`open_gguf` loads a file with the GGUF's own chat template as the chat format (never a built-in format
guessed from it) and turns llama.cpp's load failure into an error naming the file and llama.cpp's own
messages, which llama-cpp-python otherwise prints to a silenced stderr. `build_info` is what every run
records of the llama.cpp it used.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import weakref
from collections import deque
from pathlib import Path
from typing import Any

from ftpipe.core.errors import PipelineError

GGUF_CHAT_FORMAT = "chat_template.default"   # llama-cpp-python's name for the GGUF's tokenizer.chat_template
_LOG_LINES: deque[str] = deque(maxlen=40)
_LOG_CALLBACK = None   # kept alive: llama.cpp holds a pointer to it
_LAST_KEPT = False
# Models still open when Python exits are closed first, while the log callback above still exists: freed later,
# during the interpreter's teardown, llama.cpp would log through a callback that is gone (a segfault at exit).
_OPEN_MODELS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_models() -> None:
    for model in list(_OPEN_MODELS):
        model.close()


def llama_cpp():
    """The llama_cpp module, with llama.cpp's log routed to this module (errors are kept for messages)."""
    global _LOG_CALLBACK
    try:
        import llama_cpp as module
    except ImportError as error:
        raise PipelineError(f"llama-cpp-python is not installed ({error}): run `make setup`, which builds it "
                            "(tools/build_llama_cpp.py)") from error
    if _LOG_CALLBACK is None:
        @module.llama_log_callback
        def keep_warnings(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            # ggml's levels: 1 debug, 2 info, 3 warn, 4 error, 5 the continuation of the previous line
            # (llama-cpp-python's own _logger table predates this numbering)
            global _LAST_KEPT
            _LAST_KEPT = level in (3, 4) or (level == 5 and _LAST_KEPT)
            if _LAST_KEPT:
                _LOG_LINES.append(text.decode("utf-8", "replace").strip())

        module.llama_log_set(keep_warnings, ctypes.c_void_p(0))
        _LOG_CALLBACK = keep_warnings
    return module


def open_gguf(path: Path, n_ctx: int, logits_all: bool = False, n_threads: int | None = None, chat: bool = True):
    """A llama_cpp.Llama over `path`, chatting with the GGUF's own template; a clear error if it cannot load.
    `chat=False` opens a file without a chat template too (a base model's GGUF, only scored on token ids)."""
    model = _load(Path(path), n_ctx=n_ctx, logits_all=logits_all, n_threads=n_threads or os.cpu_count(),
                  chat_format=GGUF_CHAT_FORMAT, seed=0)
    if chat and GGUF_CHAT_FORMAT not in model._chat_handlers:
        model.close()
        raise PipelineError(f"{path}: this GGUF has no chat template (tokenizer.chat_template): llama.cpp cannot "
                            "format a chat with the template the model was trained with")
    return model


def gguf_metadata(path: Path) -> dict[str, str]:
    """The GGUF's metadata as llama.cpp reads it (key -> value as text; arrays such as the vocabulary left out),
    from the vocabulary alone: under a second, where the gguf package's reader parses every array in Python."""
    model = _load(Path(path), vocab_only=True)
    try:
        return dict(model.metadata)
    finally:
        model.close()


def _load(path: Path, **options: Any):
    """llama_cpp.Llama(path, **options), or a PipelineError naming the file and llama.cpp's own messages."""
    module = llama_cpp()
    if not path.is_file():
        raise PipelineError(f"{path}: no such GGUF file")
    _LOG_LINES.clear()
    try:
        model = module.Llama(model_path=str(path), verbose=False, **options)
    except (ValueError, RuntimeError) as error:
        said = "; ".join(line for line in _LOG_LINES if line) or str(error)
        raise PipelineError(f"{path}: llama.cpp cannot load this GGUF: {said}") from error
    _OPEN_MODELS.add(model)
    return model


def build_info() -> dict[str, Any]:
    """The llama.cpp this environment runs: its build (ftpipe.core.provenance.llama_cpp_build) and the CPU
    features llama.cpp itself reports at run time."""
    from ftpipe.core.provenance import llama_cpp_build

    info = llama_cpp_build()
    if info:
        info["system_info"] = llama_cpp().llama_print_system_info().decode().strip()
    return info
