"""The evaluate and audit sections of params.yaml: what is measured, and the gates that can stop a release.

Split from ftpipe/core/params.py (which imports these) to keep each file small; the same rules hold: every key
is required, and each check names the key and the fix."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

TASK_METRICS = ("rougeL", "chrF", "exact_match", "token_f1")
# what drift can compare: the task metrics (higher is better) and two losses (lower is better)
DRIFT_METRICS = (*TASK_METRICS, "loss", "general_loss")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class GeneralTextParams:
    source: str                   # python_reference (built in) or a .txt / .jsonl file of this repository
    license: str                  # SPDX id of that text (the built-in: PSF-2.0)
    passages: int                 # passages scored, each at most max_tokens long
    max_tokens: int

    def __post_init__(self) -> None:
        _check(self.passages > 0 and self.max_tokens >= 16, "general_text: passages must be positive and "
                                                             "max_tokens at least 16")
        _check(bool(self.license.strip()), "general_text.license: declare the text's license (an SPDX id)")


@dataclass(frozen=True)
class HarnessParams:
    tasks: list[str]              # lm-evaluation-harness task names; [] runs none
    include_path: Optional[str]   # a folder of local task YAMLs (e.g. evaluation/harness_tasks)
    limit: Optional[int]          # examples per task (null: all)
    num_fewshot: Optional[int]

    def __post_init__(self) -> None:
        _check(self.limit is None or self.limit > 0, "harness.limit: must be positive or null (all)")
        _check(self.num_fewshot is None or self.num_fewshot >= 0, "harness.num_fewshot: must be 0 or more, or null")


@dataclass(frozen=True)
class EvaluateGateParams:
    task_metric: Literal["rougeL", "chrF", "exact_match", "token_f1"]
    min_gain: Optional[float]           # tuned minus base on task_metric, all test examples
    min_source_score: Optional[float]   # the tuned model's task_metric on every data source
    max_tuned_loss: Optional[float]     # the tuned model's test loss (nats)
    max_general_loss_increase: Optional[float]   # tuned minus base loss on the general text (nats)


@dataclass(frozen=True)
class DriftParams:
    baseline: Optional[str]       # the last release's metrics (python -m ftpipe.release.baseline); null: no check
    max_regression: dict[str, float]   # per metric: how much worse than the baseline is allowed
    on_regression: Literal["fail", "warn"]

    def __post_init__(self) -> None:
        unknown = sorted(set(self.max_regression) - set(DRIFT_METRICS))
        _check(not unknown, f"drift.max_regression: unknown metric(s) {unknown}; known: {', '.join(DRIFT_METRICS)}")
        _check(all(value >= 0 for value in self.max_regression.values()),
               "drift.max_regression: each allowance must be 0 or more")


@dataclass(frozen=True)
class EvaluateParams:
    max_examples: Optional[int]   # evaluate on at most this many test rows (a fixed, hash-ordered subset)
    batch_size: Union[int, Literal["auto"]]   # auto: as many prompts a batch as the GPU's free memory holds
    max_new_tokens: int
    num_samples: int              # generations written to the samples file
    general_text: GeneralTextParams
    harness: HarnessParams
    gate: EvaluateGateParams
    drift: DriftParams

    def __post_init__(self) -> None:
        _check(self.max_examples is None or self.max_examples > 0, "max_examples: must be positive or null (all)")
        _check(self.batch_size == "auto" or self.batch_size > 0, "batch_size: must be positive, or auto")
        _check(self.max_new_tokens > 0, "max_new_tokens must be positive")
        _check(self.num_samples >= 0, "num_samples: must be 0 or more")


@dataclass(frozen=True)
class CanaryParams:
    enabled: bool                 # off by default: canaries change the training data (the report says so)
    seed: int
    repeats: list[int]            # one canary per entry, planted that many times in the train split
    digits: int                   # digits of each secret
    candidates: int               # random secrets of the same shape each canary is ranked among

    def __post_init__(self) -> None:
        _check(all(count > 0 for count in self.repeats), "canaries.repeats: each count must be positive")
        _check(4 <= self.digits <= 32, "canaries.digits: between 4 and 32")
        _check(self.candidates >= 10, "canaries.candidates: at least 10")


@dataclass(frozen=True)
class AuditGateParams:
    max_extraction_gap: Optional[float]         # any source: tuned on train minus tuned on test, prefix share
    max_personal_data_exact: Optional[float]    # sources declared personal_data: verbatim-extraction rate
    max_pii_leaks: Optional[int]                # real-looking PII values in the tuned model's audit answers
    max_canary_exposure: Optional[float]        # bits; log2(candidates + 1) is the most there is


@dataclass(frozen=True)
class AuditParams:
    train_examples: int           # training conversations prompted per source (and as many test ones)
    max_new_tokens: int
    batch_size: int
    canaries: CanaryParams
    gate: AuditGateParams

    def __post_init__(self) -> None:
        _check(self.train_examples > 0 and self.max_new_tokens > 0 and self.batch_size > 0,
               "train_examples, max_new_tokens and batch_size must be positive")
