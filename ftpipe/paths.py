"""Where each stage reads and writes. dvc.yaml names the same paths (tests/test_dvc_yaml.py checks it)."""
from pathlib import Path

PARAMS_FILE = Path("params.yaml")

SOURCES_DIR = Path("data/sources")          # the user's own data files (a dependency of ingest)
LOCAL_MODELS_DIR = Path("models/source")    # the user's own base model folders (a dependency of base)

BASE_DIR = Path("models/base")
RAW_DIR = Path("data/raw")
CLEAN_DIR = Path("data/clean")
VALIDATION_DIR = Path("data/validation")
TOKENIZED_DIR = Path("data/tokenized")
CHECKPOINTS_DIR = Path("models/checkpoints")
ADAPTER_DIR = Path("models/adapter")
EVALUATION_DIR = Path("data/evaluation")
MERGED_DIR = Path("models/merged")
GGUF_DIR = Path("models/gguf")

METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("metrics/plots")


def metrics_file(stage: str) -> Path:
    return METRICS_DIR / f"{stage}.json"


PROVENANCE_FILE = "provenance.json"   # written into every output folder
SPLITS = ("train", "validation", "test")
