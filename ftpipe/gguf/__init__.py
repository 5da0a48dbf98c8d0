"""GGUF files: made by llama.cpp's converter and quantizer (export), opened and run in llama.cpp (runtime),
checked against the merged model in the runtime that serves them (parity), described (contents), and
packaged for Ollama (modelfile)."""
