"""What `--model` names, resolved to the folder or file to load: the pipeline's outputs in a project (base,
adapter, merged, gguf, gguf:<type>) or a path (a .gguf file or a Hugging Face model folder). Nothing is loaded
here; a missing output is an error naming its path and the command that builds it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ftpipe.core.errors import PipelineError
from ftpipe.core.gguf_types import GGUF_TYPES
from ftpipe.core.params import load_params
from ftpipe.core.paths import ADAPTER_DIR, BASE_DIR, GGUF_DIR, MERGED_DIR, PARAMS_FILE, TOKENIZED_DIR
from ftpipe.data.chat_template import TEMPLATE_FILE

BUILD_HINT = "run `make pipeline` (or `dvc repro`) to build it"
VALID = ("base, adapter, merged, gguf (the first GGUF of quantize.types), gguf:<type> "
         f"({', '.join(GGUF_TYPES)}), or a path to a .gguf file or a Hugging Face model folder")


@dataclass(frozen=True)
class ModelSpec:
    label: str                    # as the user named it: merged, gguf:f16, or the path
    runtime: str                  # "transformers" or "llama.cpp"
    path: Path                    # the Hugging Face model folder or the GGUF file
    adapter: Path | None = None   # a LoRA adapter folder attached to `path` (transformers only)
    # base and adapter: the chat template the tokenize stage saved (tokenize.chat_template), when there is one; the
    # merged model and the GGUFs carry it themselves
    chat_template: Path | None = None

    def location(self) -> str:
        return f"{self.path} + {self.adapter}" if self.adapter else str(self.path)


def resolve(value: str, project: Path) -> ModelSpec:
    """The model `value` (a --model or --tuned value) names in `project`."""
    project = Path(project)
    trained_template = project / TOKENIZED_DIR / TEMPLATE_FILE
    trained_template = trained_template if trained_template.is_file() else None
    if value == "merged":
        return ModelSpec(value, "transformers", hf_folder(project / MERGED_DIR, "merged model", BUILD_HINT))
    if value == "base":
        return ModelSpec(value, "transformers", hf_folder(project / BASE_DIR, "base model", BUILD_HINT),
                         chat_template=trained_template)
    if value == "adapter":
        base = hf_folder(project / BASE_DIR, "base model", BUILD_HINT)
        adapter = project / ADAPTER_DIR
        if not (adapter / "adapter_config.json").is_file():
            raise PipelineError(f"{adapter}: no LoRA adapter here (adapter_config.json missing): {BUILD_HINT}")
        return ModelSpec(value, "transformers", base, adapter, trained_template)
    if value == "gguf":
        gguf_type, path = first_gguf(project)
        return ModelSpec(f"gguf:{gguf_type}", "llama.cpp", path)
    if value.startswith("gguf:"):
        gguf_type = value.removeprefix("gguf:")
        if gguf_type not in GGUF_TYPES:
            raise PipelineError(f"--model {value}: unknown GGUF type {gguf_type!r}; valid: {', '.join(GGUF_TYPES)}")
        path = project / GGUF_DIR / f"model-{gguf_type}.gguf"
        if not path.is_file():
            raise PipelineError(f"{path}: not found: {BUILD_HINT}, with {gguf_type} in quantize.types (params.yaml)")
        return ModelSpec(value, "llama.cpp", path)
    path = Path(value)
    if path.is_dir():
        return ModelSpec(value, "transformers",
                         hf_folder(path, "Hugging Face model", "give a model folder or a .gguf file"))
    if path.is_file():
        return ModelSpec(value, "llama.cpp", path)   # llama.cpp itself says when it is not a GGUF
    if "/" in value or value.endswith(".gguf"):
        raise PipelineError(f"{path}: no such file or folder (--model takes {VALID})")
    raise PipelineError(f"--model {value!r}: unknown model; use {VALID}")


def hf_folder(folder: Path, what: str, hint: str) -> Path:
    if not folder.is_dir():
        raise PipelineError(f"{folder}: no such folder (the {what}): {hint}")
    if not (folder / "config.json").is_file():
        raise PipelineError(f"{folder}: no {what} here (config.json missing): {hint}")
    return folder


def first_gguf(project: Path) -> tuple[str, Path]:
    """(type, path) of the first models/gguf/model-<type>.gguf in the order of quantize.types; then any other
    type, in case params.yaml changed since the files were written."""
    folder = project / GGUF_DIR
    params_file = project / PARAMS_FILE
    wanted = list(load_params(params_file).quantize.types) if params_file.is_file() else []
    for gguf_type in [*wanted, *(t for t in GGUF_TYPES if t not in wanted)]:
        path = folder / f"model-{gguf_type}.gguf"
        if path.is_file():
            return gguf_type, path
    listed = f" (model-<type>.gguf for quantize.types {', '.join(wanted)})" if wanted else ""
    raise PipelineError(f"{folder}: no GGUF file{listed}: {BUILD_HINT}")
