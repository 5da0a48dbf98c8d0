"""Can every upstream part handle the base model's architecture? Asked before training, so that a model whose
GGUF export cannot work fails in minutes, naming the part, not after hours of training at the quantize stage.

    from ftpipe.model.architectures import architecture_support, require_supported_architecture
    report = architecture_support(Path("models/base"))   # what each part says, read from config.json
    require_supported_architecture(Path("models/base"))  # PipelineError naming the part that cannot

The parts, and how each is asked (none converts, loads weights or trains):

- llama.cpp's converter (convert_hf_to_gguf.py of the llama.cpp build, ftpipe.gguf.export): its registry of
  Hugging Face architectures (`TEXT_MODEL_MAP` in its `conversion` package) and the GGUF architecture the
  registered class writes (its `model_arch`, named by the converter's own gguf-py `MODEL_ARCH_NAMES`), read from
  its source files without importing it (that would import torch and transformers);
- llama.cpp's runtime (the llama-cpp-python build): asked by the runtime itself: a GGUF holding nothing but
  `general.architecture` is loaded vocabulary-only; llama.cpp stops at "unknown model architecture" for an
  architecture it does not implement, and only later (at the missing vocabulary) for one it does;
- llama.cpp's tokenizer: the converter writes a vocabulary-only GGUF of the base (its tokenizer and metadata, no
  tensors: seconds), llama.cpp loads it, and a few fixed texts, rendered as chats in the base's own template, must
  become the same token ids as with the base's tokenizer in transformers, as the quantize stage requires of every
  GGUF.
  It catches what the architecture alone does not: a pre-tokenizer the converter does not recognise, or a
  vocabulary transformers reads differently (transformers 5 forces its own tokenizer class for some model types,
  e.g. a Qwen2-architecture model shipped with another family's tokenizer);
- Unsloth (train.backend unsloth, on a CUDA GPU; not importable on a CPU machine, so a table, not a probe):
  UNSLOTH_OPTIMIZED, read from Unsloth 2026.10.9's `FastLanguageModel.from_pretrained` (unsloth/models/loader.py):
  these model types get Unsloth's own hand-written implementation; every other model type goes through its
  generic `FastModel` path, which trains transformers' own modeling code patched and compiled by Unsloth. Unsloth
  refuses no architecture here, so this part only informs.
"""
from __future__ import annotations

import ast
import json
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ftpipe.core.errors import PipelineError

UNSLOTH_VERSION = "2026.10.9"
# model_type -> Unsloth's own implementation (FastLanguageModel.from_pretrained dispatch in unsloth/models/loader.py
# of Unsloth 2026.10.9); any other model type: FastModel (transformers' modeling code, patched and compiled)
UNSLOTH_OPTIMIZED = {"llama": "FastLlamaModel", "mistral": "FastMistralModel", "gemma": "FastGemmaModel",
                     "gemma2": "FastGemma2Model", "qwen2": "FastQwen2Model", "qwen3": "FastQwen3Model"}

CONVERTER_PART, RUNTIME_PART, UNSLOTH_PART = "llama.cpp's GGUF converter", "llama.cpp's runtime", "Unsloth"
TOKENIZER_PART = "llama.cpp's tokenizer"
# What the tokenizer part encodes in both runtimes: words, digits, code, whitespace runs, non-ASCII text.
TOKENIZER_TEXTS = ("The capital of France is Paris, and 2 + 2 = 4.",
                   "def area(r):\n    return 3.14159 * r ** 2  # 1,000,000 cm²",
                   "  two leading spaces,\ttabs\n\nand blank lines",
                   "Ünïcödé: café, naïve, 東京, Ελληνικά, emoji 🙂.")



@dataclass(frozen=True)
class PartSupport:
    part: str
    supported: bool | None   # None: not known (the part is not installed here, or could not be asked)
    detail: str


@dataclass(frozen=True)
class ArchitectureSupport:
    architecture: str         # config.json "architectures"[0] (the text model's, as the converter reads it)
    model_type: str
    gguf_arch: str | None     # the llama.cpp architecture the converter writes for it
    parts: list[PartSupport] = field(default_factory=list)

    @property
    def unsupported(self) -> list[PartSupport]:
        return [part for part in self.parts if part.supported is False]

    def lines(self) -> list[str]:
        marks = {True: "yes", False: "NO", None: "unknown"}
        return [f"{part.part}: {marks[part.supported]} ({part.detail})" for part in self.parts]


def model_architecture(config: dict) -> tuple[str, str]:
    """(architecture, model_type) as llama.cpp's converter picks them: a multimodal config's text model first."""
    text = config.get("text_config") or {}
    architectures = text.get("architectures") or config.get("architectures") or []
    if not architectures:
        raise PipelineError("the base model's config.json names no architecture (\"architectures\"): llama.cpp's "
                            "converter and transformers pick the model class from it")
    return architectures[0], str(config.get("model_type") or text.get("model_type") or "")


# --- llama.cpp's converter, read from its source ---------------------------------------------------------------

def _module_tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _assigned_literal(tree: ast.Module, name: str):
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        if any(isinstance(target, ast.Name) and target.id == name for target in targets) and node.value is not None:
            return node.value
    return None


@lru_cache(maxsize=4)
def converter_registry(converter_dir: Path) -> dict[str, str]:
    """Hugging Face architecture -> the converter module that registers it (conversion/__init__.py TEXT_MODEL_MAP)."""
    value = _assigned_literal(_module_tree(converter_dir / "conversion" / "__init__.py"), "TEXT_MODEL_MAP")
    if value is None:
        raise PipelineError(f"{converter_dir}: llama.cpp's converter has no TEXT_MODEL_MAP in conversion/__init__.py "
                            "(a converter layout this pipeline does not know)")
    return ast.literal_eval(value)


@lru_cache(maxsize=4)
def gguf_arch_names(converter_dir: Path) -> dict[str, str]:
    """MODEL_ARCH member -> GGUF architecture name, from the converter's own gguf-py (gguf/constants.py)."""
    value = _assigned_literal(_module_tree(converter_dir / "gguf-py" / "gguf" / "constants.py"), "MODEL_ARCH_NAMES")
    if not isinstance(value, ast.Dict):
        return {}
    return {key.attr: item.value for key, item in zip(value.keys, value.values)
            if isinstance(key, ast.Attribute) and isinstance(item, ast.Constant)}


def _registered_class(tree: ast.Module, architecture: str) -> ast.ClassDef | None:
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for decorator in node.decorator_list:
            if (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
                    and decorator.func.attr == "register"
                    and any(isinstance(arg, ast.Constant) and arg.value == architecture for arg in decorator.args)):
                return node
    return None


def _class_model_arch(converter_dir: Path, module: str, class_name: str, depth: int = 0) -> str | None:
    """The MODEL_ARCH member a converter class writes: its `model_arch = gguf.MODEL_ARCH.X`, else a base class's."""
    path = converter_dir / "conversion" / f"{module}.py"
    if depth > 8 or not path.is_file():
        return None
    tree = _module_tree(path)
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    if node is None:
        return None
    for statement in node.body:
        value = statement.value if isinstance(statement, (ast.Assign, ast.AnnAssign)) else None
        targets = statement.targets if isinstance(statement, ast.Assign) else \
            [statement.target] if isinstance(statement, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "model_arch" for t in targets) and isinstance(value, ast.Attribute):
            return value.attr
    imported = {alias.asname or alias.name: (node_.module or "").lstrip(".") or "__init__"
                for node_ in tree.body if isinstance(node_, ast.ImportFrom) and node_.level == 1
                for alias in node_.names}
    for base in node.bases:
        name = base.id if isinstance(base, ast.Name) else None
        if name is None or name in ("TextModel", "ModelBase", "MmprojModel"):
            continue
        found = _class_model_arch(converter_dir, imported.get(name, module), name, depth + 1)
        if found:
            return found
    return None


def converter_support(architecture: str, converter_dir: Path) -> tuple[PartSupport, str | None]:
    """Whether llama.cpp's converter registers `architecture`, and the GGUF architecture it writes for it."""
    if not (converter_dir / "conversion" / "__init__.py").is_file():
        return PartSupport(CONVERTER_PART, None, f"not installed ({converter_dir}): run `make setup`"), None
    module = converter_registry(converter_dir).get(architecture)
    if module is None:
        return PartSupport(CONVERTER_PART, False, f"{architecture} is not among the architectures it converts"), None
    tree = _module_tree(converter_dir / "conversion" / f"{module}.py")
    registered = _registered_class(tree, architecture)
    member = _class_model_arch(converter_dir, module, registered.name) if registered else None
    gguf_arch = gguf_arch_names(converter_dir).get(member) if member else None
    detail = (f"converted by {registered.name if registered else module} into GGUF architecture {gguf_arch!r}"
              if gguf_arch else f"registered in conversion/{module}.py; its GGUF architecture is chosen at "
                                "conversion time")
    return PartSupport(CONVERTER_PART, True, detail), gguf_arch


# --- llama.cpp's runtime, asked itself ---------------------------------------------------------------------------

@lru_cache(maxsize=64)
def runtime_knows(gguf_arch: str) -> bool | None:
    """Whether the installed llama.cpp implements GGUF architecture `gguf_arch` (None: llama.cpp not installed).

    A GGUF with `general.architecture` and nothing else is loaded vocabulary-only: llama.cpp reads the
    architecture first and fails with "unknown model architecture" for one it does not implement; for one it
    does, loading stops later, at the missing vocabulary."""
    try:
        from gguf import GGUFWriter

        from ftpipe.gguf.runtime import _LOG_LINES, llama_cpp

        module = llama_cpp()
    except (ImportError, PipelineError):
        return None
    with tempfile.TemporaryDirectory(prefix="ftpipe-arch-probe-") as folder:
        path = Path(folder) / "probe.gguf"
        writer = GGUFWriter(str(path), gguf_arch)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        params = module.llama_model_default_params()
        params.vocab_only = True
        _LOG_LINES.clear()
        model = module.llama_model_load_from_file(str(path).encode(), params)
        if model:   # a vocabulary-less file should not load; if it does, the architecture is known
            module.llama_model_free(model)
            return True
        said = " ".join(_LOG_LINES)
    return "unknown model architecture" not in said


def runtime_support(gguf_arch: str | None) -> PartSupport:
    if gguf_arch is None:
        return PartSupport(RUNTIME_PART, None, "the converter's GGUF architecture is not known before conversion")
    from ftpipe.core.provenance import llama_cpp_build

    build = llama_cpp_build()
    which = f"llama.cpp {build.get('llama_cpp_commit') or '(commit unknown)'}" if build else "llama.cpp"
    known = runtime_knows(gguf_arch)
    if known is None:
        return PartSupport(RUNTIME_PART, None, "llama-cpp-python is not installed: run `make setup`")
    return PartSupport(RUNTIME_PART, known, f"{which} {'implements' if known else 'does not implement'} GGUF "
                                            f"architecture {gguf_arch!r}")


# --- llama.cpp's tokenizer, asked itself ---------------------------------------------------------------------

def probe_texts(tokenizer) -> list[str]:
    """TOKENIZER_TEXTS as the pipeline tokenizes text: inside a chat, here the base's own template (a question and
    its answer); without one, each after a special token, where any template puts it. Text alone is not asked: a
    SentencePiece GGUF has one add_space_prefix flag, set for text after a special token (align_space_prefix), so
    llama.cpp may start a bare text differently, which no chat-rendered text ever is."""
    from ftpipe.model.modeling import render_chat

    if tokenizer.chat_template:
        return [render_chat(tokenizer, [{"role": "user", "content": text}, {"role": "assistant", "content": text}])
                for text in TOKENIZER_TEXTS]
    marker = tokenizer.eos_token or tokenizer.bos_token or ""
    return [f"{marker}{text}" for text in TOKENIZER_TEXTS]


def tokenizer_support(model_dir: Path) -> PartSupport:
    """Does llama.cpp, given the converter's vocabulary-only GGUF of `model_dir`, tokenize as transformers does?"""
    from ftpipe.gguf.export import align_space_prefix, convert
    from ftpipe.gguf.parity import tokenizer_mismatches
    from ftpipe.gguf.runtime import llama_cpp
    from ftpipe.model.modeling import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    texts = probe_texts(tokenizer)
    with tempfile.TemporaryDirectory(prefix="ftpipe-vocab-probe-") as folder:
        path = Path(folder) / "vocab.gguf"
        try:
            convert(model_dir, "f16", path, vocab_only=True)
        except PipelineError as err:
            return PartSupport(TOKENIZER_PART, False, f"the converter cannot write its vocabulary: {err}")
        align_space_prefix(model_dir, [path])   # as the quantize stage does for SentencePiece vocabularies
        llm = llama_cpp().Llama(model_path=str(path), vocab_only=True, verbose=False)
        try:
            differ = tokenizer_mismatches(llm, tokenizer, texts)
        finally:
            llm.close()
    if differ:
        return PartSupport(TOKENIZER_PART, False, f"{len(differ)} of {len(texts)} probe texts become other tokens in "
                                                  f"llama.cpp than in transformers, first {differ[0]!r}")
    return PartSupport(TOKENIZER_PART, True, f"{len(texts)} probe texts become the same tokens in both")


# --- Unsloth, from its table -------------------------------------------------------------------------------------

def unsloth_support(model_type: str) -> PartSupport:
    optimized = UNSLOTH_OPTIMIZED.get(model_type)
    if optimized:
        return PartSupport(UNSLOTH_PART, True, f"Unsloth {UNSLOTH_VERSION} trains model type {model_type!r} with "
                                               f"its own {optimized}")
    return PartSupport(UNSLOTH_PART, True, f"Unsloth {UNSLOTH_VERSION} has no implementation of its own for model "
                                           f"type {model_type!r}: it falls back to transformers' modeling code "
                                           "(its generic FastModel path)")


# --- all parts ---------------------------------------------------------------------------------------------------

def architecture_support(model_dir: Path, converter_dir: Path | None = None) -> ArchitectureSupport:
    """What each upstream part says about the architecture in `model_dir`/config.json."""
    from ftpipe.core.provenance import LLAMA_CPP_CONVERTER_DIR

    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise PipelineError(f"{model_dir}: no config.json, so its architecture is unknown")
    architecture, model_type = model_architecture(json.loads(config_path.read_text()))
    converter, gguf_arch = converter_support(architecture, Path(converter_dir or LLAMA_CPP_CONVERTER_DIR))
    runtime = runtime_support(gguf_arch)
    parts = [converter, runtime]
    if converter_dir is None and converter.supported and runtime.supported:   # the installed converter, a known arch
        parts.append(tokenizer_support(Path(model_dir)))
    return ArchitectureSupport(architecture, model_type, gguf_arch, [*parts, unsloth_support(model_type)])


def require_supported_architecture(model_dir: Path, converter_dir: Path | None = None) -> ArchitectureSupport:
    """architecture_support, raising a PipelineError that names each part that cannot handle the architecture."""
    report = architecture_support(model_dir, converter_dir)
    if report.unsupported:
        raise PipelineError(
            f"the base model's architecture {report.architecture} (model type {report.model_type!r}) cannot go "
            "through this pipeline: " + "; ".join(f"{part.part}: {part.detail}" for part in report.unsupported)
            + ". The quantize stage exports every trained model to GGUF with these (quantize.types), so it would fail "
              "after training. Choose a base model they support (base.model), or a llama.cpp "
              "build that supports this one (tools/build_llama_cpp.py).")
    return report
