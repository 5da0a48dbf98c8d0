"""Base models of other kinds than the tiny HF folder, for the base stage's tests (built offline in seconds):

- `sentencepiece_model_dir`: a tiny Llama whose tokenizer is a SentencePiece model trained here, shipped as Hub
  repos of Llama, Gemma or Phi-3 ship it: tokenizer.model beside tokenizer.json, tokenizer_config.json and the
  chat template;
- `gguf_base`: the tiny model as an f16 GGUF (llama.cpp's converter), with sharp next-token distributions;
- `permute_rope_rows`: the classic GGUF-reader bug (Q/K rows in the wrong RoPE order), to corrupt what
  transformers read.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from tests.model_fixtures import chat_row

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# 256 byte-fallback pieces + <unk>, <s>, </s> and the two chat markers, and room for ~140 merges
SENTENCEPIECE_VOCAB = 400


def sentencepiece_training_text() -> list[str]:
    """A few hundred lines like the test data's conversations (digits, °, non-ASCII, newlines split)."""
    return [line for n in range(200) for message in chat_row(n)["messages"]
            for line in message["content"].splitlines() if line]


def sentencepiece_model_dir(folder: Path) -> Path:
    """A 2-layer Llama (vocabulary 400) whose tokenizer is a SentencePiece BPE model (byte fallback, as Llama's)."""
    import sentencepiece
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentencepiece_training_text()), model_writer=model_file,
        vocab_size=SENTENCEPIECE_VOCAB, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        num_threads=1, minloglevel=2)
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(model_file.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>",
        "add_bos_token": True}))
    tokenizer = AutoTokenizer.from_pretrained(folder)   # transformers converts the SentencePiece model
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)   # tokenizer.json, tokenizer_config.json, chat_template.jinja (.model stays)

    torch.manual_seed(0)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=eos)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=eos, max_new_tokens=32)
    model.save_pretrained(folder)
    return folder


def gguf_base(model_dir: Path, folder: Path) -> Path:
    """`model_dir` (the tiny random model) as folder/base-f16.gguf. Its blocks are scaled up as in
    model_fixtures.lively_copy (so that attention counts) and its final norm by 40: the random model's next-token
    distributions are near uniform, and two near-uniform distributions are close whatever a reader does;
    sharp ones show a misread tensor (measured: 3e-6 nats read correctly, 0.38 with permute_rope_rows)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftpipe.gguf.export import convert
    from ftpipe.model.tokenizer_files import copy_tokenizer_files
    from tests.model_fixtures import scale_up_blocks

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    scale_up_blocks(model)
    with torch.no_grad():
        model.model.norm.weight.mul_(40)
    hf_folder = folder / "hf"
    model.save_pretrained(hf_folder)
    copy_tokenizer_files(model_dir, hf_folder)
    path = folder / "base-f16.gguf"
    convert(hf_folder, "f16", path)
    return path


def permute_rope_rows(model) -> None:
    """Reorder the Q and K rows of every attention layer between the two RoPE layouts (llama.cpp's converter
    permutes them on the way into a GGUF; a reader that forgets to undo it builds a model that runs, but wrongly)."""
    import torch

    def permute(weight, heads: int):
        return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
            weight.shape)

    config = model.config
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            attention.q_proj.weight.copy_(permute(attention.q_proj.weight, config.num_attention_heads))
            attention.k_proj.weight.copy_(permute(attention.k_proj.weight, config.num_key_value_heads))
