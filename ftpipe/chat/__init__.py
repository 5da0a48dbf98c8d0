"""`python -m ftpipe.chat`: chat in the terminal with the models of the last pipeline run.

    python -m ftpipe.chat                              # the merged model, multi-turn (/reset, /exit)
    python -m ftpipe.chat --model gguf:q4_k_m          # a GGUF in llama.cpp (base, adapter, merged, gguf, a path)
    python -m ftpipe.chat --prompt "What does os.path.join do?"   # one answer on stdout, for scripts
    python -m ftpipe.chat --side-by-side               # each prompt answered by the base and the tuned model

models.py resolves --model to a folder or file of the project, backends.py runs it (transformers for Hugging Face
folders, llama.cpp for GGUF files), session.py holds the conversations and the terminal loop, cli.py the options.
"""
