"""copy_tokenizer_files (ftpipe/model/tokenizer_files.py): every tokenizer file of a model folder, and only those,
copied byte for byte (a cache symlink as its file); a folder without a vocabulary is named."""
from __future__ import annotations

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.model.tokenizer_files import copy_tokenizer_files

TOKENIZER = {"tokenizer.json": b'{"model": {}}', "tokenizer_config.json": b'{"x": 1}\r\n',
             "tokenizer.model": b"\x00sp\xff", "special_tokens_map.json": b"{}", "added_tokens.json": b"{}",
             "vocab.json": b"{}", "merges.txt": b"a b\n",
             "chat_template.jinja": "{{ 'é' }}".encode(), "qwen.tiktoken": b"YQ== 0\n",
             "additional_chat_templates/tool_use.jinja": b"{{ tools }}"}
NOT_TOKENIZER = {"config.json": b"{}", "generation_config.json": b"{}", "model.safetensors": b"w",
                 "README.md": b"# card", "notes/vocab.json": b"{}"}


def write(folder, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def test_every_tokenizer_file_and_only_those_is_copied_byte_for_byte(tmp_path):
    source, out = tmp_path / "source", tmp_path / "out"
    write(source, {**TOKENIZER, **NOT_TOKENIZER})
    out.mkdir()
    assert copy_tokenizer_files(source, out) == sorted(TOKENIZER)
    copied = {path.relative_to(out).as_posix(): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert copied == TOKENIZER


def test_a_symlinked_file_is_copied_as_its_content(tmp_path):
    """The Hugging Face cache links a snapshot's files to its blobs: the copy is a file, not a link."""
    blobs, source, out = tmp_path / "blobs", tmp_path / "snapshot", tmp_path / "out"
    write(blobs, {"abc123": b'{"vocab": 1}'})
    source.mkdir()
    (source / "tokenizer.json").symlink_to(blobs / "abc123")
    out.mkdir()
    assert copy_tokenizer_files(source, out) == ["tokenizer.json"]
    assert not (out / "tokenizer.json").is_symlink() and (out / "tokenizer.json").read_bytes() == b'{"vocab": 1}'


def test_a_folder_without_a_vocabulary_is_named(tmp_path):
    write(tmp_path / "source", {"config.json": b"{}", "tokenizer_config.json": b"{}", "chat_template.jinja": b"x"})
    with pytest.raises(PipelineError, match="source: no tokenizer here .*found \\['chat_template.jinja', "
                                            "'tokenizer_config.json'\\]"):
        copy_tokenizer_files(tmp_path / "source", tmp_path)
