"""Where each stage reads and writes. dvc.yaml names the same paths (tests/test_dvc_yaml.py checks it)."""
from pathlib import Path

PARAMS_FILE = Path("params.yaml")
DVC_YAML = Path("dvc.yaml")

SOURCES_DIR = Path("data/sources")          # the user's own data files (a dependency of ingest)
LOCAL_MODELS_DIR = Path("models/source")    # the user's own base model folders (a dependency of base)

CHECKED_PARAMS_DIR = Path("data/checked_params")   # params.yaml validated (stages/check_params.py)
BASE_DIR = Path("models/base")
RAW_DIR = Path("data/raw")
CLEAN_DIR = Path("data/clean")
VALIDATION_DIR = Path("data/validation")
TOKENIZED_DIR = Path("data/tokenized")
CHECKPOINTS_DIR = Path("models/checkpoints")
ADAPTER_DIR = Path("models/adapter")
EVALUATION_DIR = Path("data/evaluation")
AUDIT_DIR = Path("data/audit")               # the memorization audit (stages/audit.py)
MERGED_DIR = Path("models/merged")
GGUF_DIR = Path("models/gguf")
COMPLIANCE_DIR = Path("data/compliance")    # the license gate's conclusion (stages/compliance.py)
# The sources declared personal data (compliance.sources[].personal_data), written by the compliance stage so
# that the audit depends on this fact alone, not on every license declaration.
PERSONAL_DATA_FILE = COMPLIANCE_DIR / "personal_data.json"
RELEASE_DIR = Path("models/release")        # report, BOM, model cards and publishable folders (stages/report.py)

# Each stage's output folder, in dvc.yaml's order (tests/test_dvc_yaml.py checks both).
STAGE_OUTPUTS = {"check_params": CHECKED_PARAMS_DIR, "base": BASE_DIR, "ingest": RAW_DIR, "compliance": COMPLIANCE_DIR,
                 "clean": CLEAN_DIR, "validate": VALIDATION_DIR, "tokenize": TOKENIZED_DIR, "train": ADAPTER_DIR,
                 "evaluate": EVALUATION_DIR,
                 "audit": AUDIT_DIR, "merge": MERGED_DIR, "quantize": GGUF_DIR, "report": RELEASE_DIR}

METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("metrics/plots")


def metrics_file(stage: str) -> Path:
    return METRICS_DIR / f"{stage}.json"


PROVENANCE_FILE = "provenance.json"   # written into every output folder
SPLITS = ("train", "validation", "test")
