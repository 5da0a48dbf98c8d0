"""Tiny models of the architectures users fine-tune most, each built offline from its transformers config class
with a tokenizer of its family's kind, its family's chat template and the generation config's end-of-turn tokens
as the real family has them (tests/families/conftest.py runs each through every stage).

- BPE families (Llama 3, Qwen3, gpt-oss) reuse the SmolLM2 byte-level BPE tokenizer (tests/conftest.py) with the
  family's special tokens added. Qwen2 cannot: transformers 5 builds the tokenizer of every `qwen2` model as
  Qwen2Tokenizer, with Qwen2's pre-tokenizer whatever tokenizer.json says, and llama.cpp's converter identifies
  that pre-tokenizer only on Qwen2's real vocabulary (by a hash of the token ids of a test text). So the Qwen2
  model has the real Qwen2 vocabulary (151,936 tokens), read from llama.cpp's own reference vocabulary
  (models/ggml-vocab-qwen2.gguf, installed with the converter by tools/build_llama_cpp.py);
- SentencePiece families (Gemma 2, Gemma 3, Mistral v0.3, Phi-3) get a `tokenizer.model` trained here, in a
  second, on a few hundred lines of the tests' chats and English, with the family's special tokens as
  SentencePiece symbols (Phi-3's as added tokens, as the real one has them); the transformers tokenizer is
  converted from that file, and the file itself is kept in the model folder (llama.cpp's converter reads it).

Every model: 2 layers (Gemma 3: 6, its pattern of sliding-window and global layers), widths that are multiples
of 64 (bitsandbytes NF4 and GGUF Q8_0 blocks fit), random weights (seed 0), bfloat16, saved with save_pretrained.
torch/transformers are imported inside the functions.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
QWEN2_VOCAB = "models/ggml-vocab-qwen2.gguf"   # under the installed converter (ftpipe.core.provenance)
TEMPLATES_DIR = REPO / "ftpipe" / "chat_templates"
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 2, 4, 2, 16


@dataclass(frozen=True)
class Family:
    name: str                         # the test id
    architecture: str                 # config.json "architectures"[0]
    model_type: str
    template: str                     # ftpipe/chat_templates/<template>.jinja
    tokenizer_kind: str               # "bpe" (SmolLM2's, tokens added), "spm" (a trained tokenizer.model) or
                                      # "qwen2-vocab" (Qwen2's real vocabulary)
    special_tokens: tuple[str, ...]   # the family's special tokens, in id order
    bos: str | None                   # the tokenizer's special tokens
    eos: str
    pad: str | None
    generation_eos: tuple[str, ...]   # generation_config.eos_token_id, as the real family has it
    gguf_arch: str                    # the llama.cpp architecture its converter writes
    # the text an assistant turn's labels decode to: (content, last turn of the conversation) -> text
    assistant_labels: Callable[[str, bool], str]
    # False: the template writes earlier answers differently in the history (Qwen3 drops their think block,
    # Phi-3 ends a conversation with <|endoftext|>, gpt-oss ends the last answer with <|return|>, Mistral moves the
    # system message into the last user turn), so only each conversation's last answer is labelled
    every_turn_labelled: bool
    config: Callable[[dict], object]  # token ids -> the transformers config
    spm: dict | None = None           # SentencePiece trainer options (spm families)
    added_after_spm: tuple[str, ...] = ()   # tokens added to the converted tokenizer (Phi-3's <|...|>)
    tokenizer_class: str | None = None
    extra_tokens: tuple[str, ...] = ()      # added, not special (Qwen3's <think>)
    # tokenizer.json in the form transformers 4 wrote for Llama-2-style SentencePiece models (Mistral v0.3's): "▁"
    # prepended to every piece of text, after each special token too, as SentencePiece and llama.cpp do
    legacy_spm_json: bool = False


def _common(ids: dict, **overrides) -> dict:
    return {"vocab_size": ids["vocab_size"], "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
            "max_position_embeddings": 2048, **overrides}


def _llama3(ids):
    from transformers import LlamaConfig

    # Llama 3.1's rope scaling, as the real 8B has it
    return LlamaConfig(**_common(ids, head_dim=HEAD_DIM, tie_word_embeddings=True, bos_token_id=ids["bos"],
                                 eos_token_id=ids["generation_eos"], max_position_embeddings=131072,
                                 rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 8192}))


def _qwen2(ids):
    from transformers import Qwen2Config

    return Qwen2Config(**_common(ids, tie_word_embeddings=True, bos_token_id=ids["pad"], eos_token_id=ids["eos"],
                                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))


def _qwen3(ids):
    from transformers import Qwen3Config

    return Qwen3Config(**_common(ids, head_dim=HEAD_DIM, tie_word_embeddings=True, bos_token_id=ids["pad"],
                                 eos_token_id=ids["eos"],
                                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))


def _gemma2(ids):
    from transformers import Gemma2Config

    return Gemma2Config(**_common(ids, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=64,
                                  bos_token_id=ids["bos"], eos_token_id=ids["generation_eos"],
                                  pad_token_id=ids["pad"]))


def _gemma3(ids):
    from transformers import Gemma3TextConfig

    # 6 layers: Gemma 3's pattern of 5 sliding-window layers, then one of full attention (llama.cpp assumes it)
    return Gemma3TextConfig(**_common(ids, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=64,
                                      num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"],
                                      bos_token_id=ids["bos"], eos_token_id=ids["generation_eos"],
                                      pad_token_id=ids["pad"]))


def _mistral(ids):
    from transformers import MistralConfig

    return MistralConfig(**_common(ids, head_dim=HEAD_DIM, sliding_window=None, tie_word_embeddings=False,
                                   bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))


def _phi3(ids):
    from transformers import Phi3Config

    return Phi3Config(**_common(ids, num_key_value_heads=HEADS, tie_word_embeddings=False, sliding_window=None,
                                original_max_position_embeddings=2048, bos_token_id=ids["bos"],
                                eos_token_id=ids["eos"], pad_token_id=ids["pad"]))


def _gpt_oss(ids):
    from transformers import GptOssConfig

    # 4 experts of width 64, 2 per token (the real 20B: 32 experts of 2880, 4 per token); yarn rope as the real one
    return GptOssConfig(**_common(ids, intermediate_size=HIDDEN, head_dim=HEAD_DIM, num_local_experts=4,
                                  num_experts_per_tok=2, sliding_window=64,
                                  layer_types=["sliding_attention", "full_attention"],
                                  max_position_embeddings=4096,
                                  bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]))


# SentencePiece trainer options: Gemma's (no dummy prefix, <pad> <eos> <bos> <unk> first) and Llama 2's
# (Mistral v0.3 and Phi-3: dummy prefix, <unk> <s> </s>); both BPE with byte fallback and split digits.
_GEMMA_SPM = dict(add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
                  eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>")
_LLAMA2_SPM = dict(add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)

FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("llama3", "LlamaForCausalLM", "llama", "llama3", "bpe",
           ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
            "<|eot_id|>", "<|python_tag|>"),
           bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
           generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), gguf_arch="llama",
           assistant_labels=lambda content, last: content + "<|eot_id|>", every_turn_labelled=True, config=_llama3),
    Family("qwen2", "Qwen2ForCausalLM", "qwen2", "qwen2.5", "qwen2-vocab",
           ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
           bos=None, eos="<|im_end|>", pad="<|endoftext|>", generation_eos=("<|im_end|>", "<|endoftext|>"),
           gguf_arch="qwen2", assistant_labels=lambda content, last: content + "<|im_end|>\n", every_turn_labelled=True,
           config=_qwen2),
    Family("qwen3", "Qwen3ForCausalLM", "qwen3", "qwen3", "bpe", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
           bos=None, eos="<|im_end|>", pad="<|endoftext|>", generation_eos=("<|im_end|>", "<|endoftext|>"),
           # the last answer (after the last user turn) is written with an empty think block, which the generation
           # prompt (without enable_thinking) leaves to the model
           gguf_arch="qwen3",
           assistant_labels=lambda content, last: "<think>\n\n</think>\n\n" + content + "<|im_end|>\n",
           every_turn_labelled=False, config=_qwen3,
           extra_tokens=("<think>", "</think>")),
    Family("gemma2", "Gemma2ForCausalLM", "gemma2", "gemma", "spm", ("<mask>", "<start_of_turn>", "<end_of_turn>"),
           bos="<bos>", eos="<eos>", pad="<pad>", generation_eos=("<eos>", "<end_of_turn>"), gguf_arch="gemma2",
           assistant_labels=lambda content, last: content + "<end_of_turn>\n", every_turn_labelled=True, config=_gemma2,
           spm=_GEMMA_SPM, tokenizer_class="GemmaTokenizer"),
    Family("gemma3", "Gemma3ForCausalLM", "gemma3_text", "gemma", "spm",
           ("<mask>", "<start_of_turn>", "<end_of_turn>"),
           bos="<bos>", eos="<eos>", pad="<pad>", generation_eos=("<eos>", "<end_of_turn>"), gguf_arch="gemma3",
           assistant_labels=lambda content, last: content + "<end_of_turn>\n", every_turn_labelled=True, config=_gemma3,
           spm=_GEMMA_SPM, tokenizer_class="GemmaTokenizer"),
    Family("mistral", "MistralForCausalLM", "mistral", "mistral", "spm",
           ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]"),
           bos="<s>", eos="</s>", pad=None, generation_eos=("</s>",), gguf_arch="llama",
           # legacy SentencePiece: the answer after "[/INST] " starts with the dummy-prefix "▁" and the space
           assistant_labels=lambda content, last: "  " + content + "</s>", every_turn_labelled=False, config=_mistral,
           spm=_LLAMA2_SPM, tokenizer_class="LlamaTokenizer", legacy_spm_json=True),
    Family("phi3", "Phi3ForCausalLM", "phi3", "phi3", "spm", (), bos="<s>", eos="<|endoftext|>",
           pad="<|endoftext|>", generation_eos=("<|endoftext|>", "<|assistant|>", "<|end|>"), gguf_arch="phi3",
           assistant_labels=lambda content, last: content + "<|end|>\n" + ("<|endoftext|>" if last else ""),
           every_turn_labelled=False, config=_phi3, spm=_LLAMA2_SPM, tokenizer_class="LlamaTokenizer",
           added_after_spm=("<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>",
                            "<|placeholder3|>", "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>",
                            "<|placeholder6|>", "<|user|>")),
    Family("gpt-oss", "GptOssForCausalLM", "gpt_oss", "gpt-oss", "bpe",
           ("<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>",
            "<|end|>", "<|message|>", "<|call|>"),
           bos="<|startoftext|>", eos="<|return|>", pad="<|endoftext|>",
           generation_eos=("<|return|>", "<|endoftext|>", "<|call|>"), gguf_arch="gpt-oss",
           # an earlier answer is labelled without the history's <|end|>: the model generates <|return|> there
           # (ftpipe.data.chat_tokens)
           assistant_labels=lambda content, last: ("<|channel|>final<|message|>" + content
                                                   + ("<|return|>" if last else "")),
           every_turn_labelled=False, config=_gpt_oss),
)}


def chat_template(name: str) -> str:
    """The family's real chat template, as the project keeps it (ftpipe/chat_templates/<name>.jinja)."""
    return (TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def spm_corpus() -> list[str]:
    """A few hundred lines: the tests' chats (every message) and English from builtin docstrings."""
    from tests.model_fixtures import chat_row

    lines = [line for n in range(120) for message in chat_row(n)["messages"] for line in message["content"].split("\n")]
    for obj in (str, bytes, list, dict, set, int, float, open, print, sorted, zip, map, range, enumerate, isinstance,
                property, staticmethod, super, type, object, Exception, ValueError, len, sum, min, max, round):
        lines += (obj.__doc__ or "").splitlines()
    return [line for line in lines if line.strip()]


def train_spm(family: Family, vocab_size: int = 700) -> bytes:
    """A BPE SentencePiece model with byte fallback and split digits, the family's special tokens as
    user-defined symbols (Mistral's as control symbols, as in its v0.3 tokenizer.model)."""
    import sentencepiece as spm

    symbols = {"control_symbols" if family.name == "mistral" else "user_defined_symbols": list(family.special_tokens)}
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(spm_corpus()), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=1.0, hard_vocab_limit=False, num_threads=1,
        minloglevel=2, **(family.spm or {}), **({k: v for k, v in symbols.items() if v}))
    return model.getvalue()


def gguf_string_arrays(path: Path, keys: tuple[str, ...]) -> dict[str, list]:
    """The string and integer arrays `keys` of a GGUF file's metadata (a vocabulary GGUF has no tensors to skip).
    gguf's GGUFReader takes 15 s on the 300,000 strings of a Qwen2 vocabulary; this, under one."""
    import struct

    data = path.read_bytes()
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    offset = 4 + 4 + 8   # magic, version, tensor count
    (count,) = struct.unpack_from("<Q", data, offset)
    offset += 8
    found: dict[str, list] = {}

    def string(at: int) -> tuple[str, int]:
        (size,) = struct.unpack_from("<Q", data, at)
        return data[at + 8:at + 8 + size].decode("utf-8"), at + 8 + size

    def value(kind: int, at: int):
        if kind == 8:
            return string(at)
        if kind == 9:
            item, size = struct.unpack_from("<IQ", data, at)
            at += 12
            items = []
            for _ in range(size):
                item_value, at = value(item, at)
                items.append(item_value)
            return items, at
        (item_value,) = struct.unpack_from("<" + scalar[kind], data, at)
        return item_value, at + struct.calcsize(scalar[kind])

    for _ in range(count):
        key, offset = string(offset)
        (kind,) = struct.unpack_from("<I", data, offset)
        item, offset = value(kind, offset + 4)
        if key in keys:
            found[key] = item
    return found


def qwen2_tokenizer(family: Family):
    """Qwen2's real tokenizer (its byte-level BPE vocabulary, merges and control tokens) from llama.cpp's reference
    vocabulary file, built as transformers 5 builds any qwen2 model's (Qwen2Tokenizer)."""
    from transformers import AddedToken, Qwen2Tokenizer

    from ftpipe.core.provenance import LLAMA_CPP_CONVERTER_DIR

    path = LLAMA_CPP_CONVERTER_DIR / QWEN2_VOCAB
    if not path.is_file():
        raise AssertionError(f"{path} is missing: run `make setup` (tools/build_llama_cpp.py installs it)")
    arrays = gguf_string_arrays(path, ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"))
    tokens = arrays["tokenizer.ggml.tokens"]
    control = [token for token, kind in zip(tokens, arrays["tokenizer.ggml.token_type"]) if kind == 3]
    assert control == list(family.special_tokens), control
    tokenizer = Qwen2Tokenizer(vocab={token: index for index, token in enumerate(tokens)},
                               merges=[tuple(merge.split(" ")) for merge in arrays["tokenizer.ggml.merges"]],
                               unk_token=None, bos_token=None, eos_token=family.eos, pad_token=family.pad)
    tokenizer.add_special_tokens({"additional_special_tokens": [
        AddedToken(token, special=True, normalized=False) for token in control]})
    return tokenizer


def build_tokenizer(family: Family, folder: Path, smollm2_tokenizer):
    """The family's tokenizer, saved into `folder` (with tokenizer.model for SentencePiece families)."""
    from transformers import AddedToken, AutoTokenizer

    template = chat_template(family.template)
    if family.tokenizer_kind == "spm":
        (folder / "tokenizer.model").write_bytes(train_spm(family))
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": family.tokenizer_class}))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        # the family's own symbols are special tokens, as in the real tokenizer's added_tokens_decoder (a decode
        # with skip_special_tokens drops them)
        tokenizer.add_special_tokens({"additional_special_tokens": [
            AddedToken(token, special=True, normalized=False) for token in family.special_tokens]})
        assert len(tokenizer) == len(tokenizer.get_vocab())   # marked, not added
        if family.added_after_spm:
            tokenizer.add_special_tokens({"additional_special_tokens": [
                AddedToken(token, special=True, normalized=False) for token in family.added_after_spm]})
    elif family.tokenizer_kind == "qwen2-vocab":
        tokenizer = qwen2_tokenizer(family)
    else:
        import copy

        tokenizer = copy.deepcopy(smollm2_tokenizer)
        new = [token for token in family.special_tokens if token not in tokenizer.get_vocab()]
        tokenizer.add_special_tokens({"additional_special_tokens": [
            AddedToken(token, special=True, normalized=False) for token in new]})
        if family.extra_tokens:
            tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in family.extra_tokens])
    tokenizer.bos_token = family.bos
    tokenizer.eos_token = family.eos
    tokenizer.pad_token = family.pad
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    if family.legacy_spm_json:
        legacy_sentencepiece_json(folder / "tokenizer.json")
    if family.tokenizer_kind == "spm" and not (folder / "tokenizer.model").exists():
        raise AssertionError("save_pretrained removed tokenizer.model")
    return tokenizer


def legacy_sentencepiece_json(path: Path) -> None:
    """Rewrite a converted Llama-2-style tokenizer.json with the normalizer transformers 4's LlamaConverter wrote
    (Prepend "▁", then spaces as "▁"; no pre-tokenizer) and its decoder."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                              {"type": "Replace", "pattern": {"String": " "},
                                                               "content": "▁"}]}
    data["pre_tokenizer"] = None
    data["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def token_ids(family: Family, tokenizer) -> dict:
    def one(token):
        return None if token is None else tokenizer.convert_tokens_to_ids(token)

    return {"vocab_size": len(tokenizer), "bos": one(family.bos), "eos": one(family.eos), "pad": one(family.pad),
            "generation_eos": [one(token) for token in family.generation_eos]}


def build_family_model(family: Family, folder: Path, smollm2_tokenizer) -> Path:
    """The tiny model of `family` as a local Hugging Face folder (bfloat16 safetensors, config, generation
    config, tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(family, folder, smollm2_tokenizer)
    ids = token_ids(family, tokenizer)
    assert None not in ids["generation_eos"], ids
    config = family.config(ids)
    config.architectures = [family.architecture]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    assert type(model).__name__ == family.architecture, type(model).__name__
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], pad_token_id=ids["pad"],
        eos_token_id=ids["generation_eos"] if len(ids["generation_eos"]) > 1 else ids["generation_eos"][0])
    model.save_pretrained(folder)
    return folder
