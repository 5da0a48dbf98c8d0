"""`python -m ftpipe.serve`: an OpenAI-compatible HTTP API over a released GGUF file.

Why we wrap llama-cpp-python's server rather than write one: a well-kept server of the field exists.
llama-cpp-python ships one (`llama_cpp.server`: FastAPI + uvicorn, /v1/chat/completions and /v1/completions with
streaming, stop sequences, JSON mode, tool calls, OpenAI-style errors), it runs the same llama.cpp build the
quantize stage checks each GGUF in, and clients of the OpenAI API (the `openai` package, LangChain, editors) already
talk to it. Writing our own would mean re-doing, and then maintaining, request validation, server-sent events and
cancellation for no gain. What this package adds is only what the pipeline knows and that server cannot:

- which file: a GGUF artifact of the release (models/release/report.json), or a given .gguf file;
- the GGUF's own chat template (ftpipe.gguf.runtime.GGUF_CHAT_FORMAT), as the quantize checks and
  `python -m ftpipe.chat` use it, and llama-cpp-python's own sampling defaults (repeat_penalty 1.0, where the
  server's request defaults say 1.1), so a greedy answer over HTTP is the answer the pipeline checked;
- /v1/models naming the model and stating the license the pipeline's license gate concluded for it, its GGUF type
  and its SHA-256 (checked against the release report at start);
- a file llama.cpp cannot load, or a port in use, fails at once with one line naming it (exit 2), not inside
  uvicorn; it listens on 127.0.0.1 unless told otherwise, and Ctrl-C or SIGTERM stop it cleanly.

Modules: release.py chooses the file and describes it from the report, app.py builds the llama-cpp-python app
around it, cli.py holds the options and runs it.
"""
