"""ftpipe.model.checkpoints: the fingerprint of a training run follows exactly what can change its
numbers (params less the result-neutral ones, the base, the data, the step's code, the backend)."""
import dataclasses
import json
import shutil
from pathlib import Path

from ftpipe.model import checkpoints
from ftpipe.model.checkpoints import STEP_CODE, fingerprint
from tests.conftest import REPO
from tests.model_fixtures import TOKENIZE, TRAIN


def cpu_fingerprint(params, base_dir, tokenized_dir) -> str:
    """The fingerprint train_tiny's runs have: the CPU backend, float32 compute (TRAIN's)."""
    return fingerprint(params, TOKENIZE.max_seq_length, base_dir, tokenized_dir, "cpu", "float32")


def test_fingerprint_follows_what_changes_the_numbers(tmp_path, tiny_base, tiny_data):
    tokenized = shutil.copytree(tiny_data[1], tmp_path / "tokenized")
    original = cpu_fingerprint(TRAIN, tiny_base, tokenized)
    assert cpu_fingerprint(TRAIN, tiny_base, tokenized) == original
    (tokenized / "provenance.json").write_text("{}")   # written after the data: not part of it
    assert cpu_fingerprint(TRAIN, tiny_base, tokenized) == original
    (tokenized / "stats.json").write_text("{}")
    assert cpu_fingerprint(TRAIN, tiny_base, tokenized) != original

    base = tmp_path / "base"
    base.mkdir()
    (base / "content.json").write_text(json.dumps({"digest": "another base"}))
    assert cpu_fingerprint(TRAIN, base, tiny_data[1]) != cpu_fingerprint(TRAIN, tiny_base, tiny_data[1])

    same = cpu_fingerprint(TRAIN, tiny_base, tiny_data[1])
    # checkpoint cadence and retention change no number: an interrupted run resumes after they change
    assert cpu_fingerprint(dataclasses.replace(TRAIN, checkpoint_every=5, checkpoint_runs_kept=0),
                           tiny_base, tiny_data[1]) == same
    # nor does the training plan: a run that ran out of memory resumes with more recomputation or smaller micro-batches
    assert cpu_fingerprint(dataclasses.replace(TRAIN, gradient_checkpointing="on", micro_batch_size=1),
                           tiny_base, tiny_data[1]) == same
    # 'auto' is resolved: the same machine gives the same run; a run started on the CPU never resumes on a GPU
    assert cpu_fingerprint(dataclasses.replace(TRAIN, backend="auto"), tiny_base, tiny_data[1]) == same
    assert fingerprint(TRAIN, TOKENIZE.max_seq_length, tiny_base, tiny_data[1], "unsloth", "float32") != same
    # on a GPU, a run started without Unsloth (transformers + peft) is not resumed by one with it
    assert len({fingerprint(TRAIN, TOKENIZE.max_seq_length, tiny_base, tiny_data[1], backend, "bfloat16")
                for backend in ("unsloth", "transformers", "cpu")}) == 3
    assert fingerprint(TRAIN, TOKENIZE.max_seq_length, tiny_base, tiny_data[1], "cpu", "bfloat16") != same
    assert fingerprint(TRAIN, TOKENIZE.max_seq_length * 2, tiny_base, tiny_data[1], "cpu", "float32") != same



def test_fingerprint_hashes_the_code_of_the_step_and_its_batches(tmp_path, monkeypatch, tiny_base, tiny_data):
    """The step (ftpipe/model/training.py), the layers LoRA adapts (ftpipe/model/lora.py), its batches
    (ftpipe/model/modeling.py) and their split into micro-batches (ftpipe/model/training_plan.py): an edit of any
    starts a new run instead of resuming checkpoints that other code wrote."""
    assert [path.resolve().relative_to(REPO).as_posix() for path in STEP_CODE] == [
        "ftpipe/model/training.py", "ftpipe/model/lora.py", "ftpipe/model/modeling.py",
        "ftpipe/model/training_plan.py"]
    copies = [Path(shutil.copy2(path, tmp_path / path.name)) for path in STEP_CODE]
    monkeypatch.setattr(checkpoints, "STEP_CODE", tuple(copies))
    original = cpu_fingerprint(TRAIN, tiny_base, tiny_data[1])
    for copy in copies:
        text = copy.read_text()
        copy.write_text(text + "\n# edited\n")
        assert cpu_fingerprint(TRAIN, tiny_base, tiny_data[1]) != original
        copy.write_text(text)
        assert cpu_fingerprint(TRAIN, tiny_base, tiny_data[1]) == original
