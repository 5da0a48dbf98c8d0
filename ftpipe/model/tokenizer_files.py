"""Carry a model's tokenizer files from one folder to another byte for byte.

Why not `AutoTokenizer.from_pretrained(...).save_pretrained(...)`: transformers (5.x) re-serializes the tokenizer
from its loaded form. It writes tokenizer.json only, dropping a source's SentencePiece `tokenizer.model`, which
llama.cpp's GGUF converter needs for Gemma and Phi-3 vocabularies, and it may rewrite tokenizer_config.json
(special tokens, added tokens, defaults of this transformers version), so the saved tokenizer can encode
differently from the one the model was trained with. A copy is the source's tokenizer, whatever transformers
version reads it later. The base stage copies a source folder's files into models/base; the merge stage copies
models/base's into models/merged.

generation_config.json is not copied: it is the model's file, and `model.save_pretrained` writes it from the
GenerationConfig that `from_pretrained` read from the very same file (the same values; only transformers_version
changes). Copying it over would make it disagree with the model written beside it, should that config be edited.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ftpipe.core.errors import PipelineError

# Every file a transformers tokenizer reads, by exact name: fast (tokenizer.json), SentencePiece (tokenizer.model,
# any *.model), GPT-2 BPE (vocab.json + merges.txt), WordPiece (vocab.txt), tiktoken, and the chat templates.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json")
TOKENIZER_PATTERNS = ("*.model", "*.tiktoken", "additional_chat_templates/*.jinja")
# Without one of these, no tokenizer can be built: only a config or a template is not a tokenizer
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")
VOCABULARY_PATTERNS = ("*.model", "*.tiktoken")


def tokenizer_file_names(folder: Path) -> list[str]:
    """The tokenizer files in `folder`, as POSIX paths relative to it, sorted."""
    folder = Path(folder)
    found = {name for name in TOKENIZER_FILES if (folder / name).is_file()}
    found |= {path.relative_to(folder).as_posix() for pattern in TOKENIZER_PATTERNS for path in folder.glob(pattern)
              if path.is_file()}
    return sorted(found)


def copy_tokenizer_files(source_dir: Path, out_dir: Path) -> list[str]:
    """Copy every tokenizer file of `source_dir` into `out_dir`, byte for byte (a symlink, as in the Hugging Face
    cache, is copied as the file it points to), replacing what `out_dir` holds under those names. Returns the
    names copied. Raises PipelineError when `source_dir` holds no vocabulary (tokenizer.json, tokenizer.model,
    vocab.json, ...)."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    names = tokenizer_file_names(source_dir)
    has_vocabulary = any(name in VOCABULARY_FILES or any(Path(name).match(pattern) for pattern in VOCABULARY_PATTERNS)
                         for name in names)
    if not has_vocabulary:
        raise PipelineError(f"{source_dir}: no tokenizer here (none of {', '.join(VOCABULARY_FILES)}, "
                            f"{', '.join(VOCABULARY_PATTERNS)}; found {names or 'no tokenizer file'}). A model folder "
                            "needs its tokenizer files beside config.json.")
    for name in names:
        target = out_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source_dir / name, target)
    return names
