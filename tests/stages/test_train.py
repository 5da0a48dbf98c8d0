"""Stage `train`: real QLoRA on the CPU (bitsandbytes NF4 base, LoRA adapters), the per-step curve,
checkpoints keyed by a fingerprint, a resume after an interruption that ends exactly where an
uninterrupted run ends, the reuse of a finished run, and training on packed rows end to end. The step's
pieces (batches, token counts, LoRA targets) are tested in tests/model/test_training.py, the fingerprint
in tests/model/test_checkpoints.py."""
import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ftpipe.core.io import read_json
from ftpipe.data.tokenized import load_tokenized
from ftpipe.model.checkpoints import fingerprint
from ftpipe.model.training import CURVE_COLUMNS, ROWS_KEY
from stages.train import curve_csv
from tests.model_fixtures import (
    PACKED_TOKENIZE,
    TARGET_MODULES,
    TOKENIZE,
    TRAIN,
    build_tokenized,
    model_probe,
    train_tiny,
)

REPO = Path(__file__).resolve().parents[2]
N_LAYERS = 2   # the tiny model's (tests/conftest.py)


def cpu_fingerprint(params, base_dir, tokenized_dir) -> str:
    """The fingerprint train_tiny's runs have: the CPU backend, float32 compute (TRAIN's)."""
    return fingerprint(params, TOKENIZE.max_seq_length, base_dir, tokenized_dir, "cpu", "float32")


def train_began():
    """A TrainerCallback that counts how often training began (0: the stage trained nothing)."""
    from transformers import TrainerCallback

    class Began(TrainerCallback):
        count = 0

        def on_train_begin(self, *args, **kwargs):
            type(self).count += 1

    return Began()


def interrupt_at(step: int):
    """A TrainerCallback that stops training like Ctrl-C once `step` has run (before its checkpoint)."""
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise KeyboardInterrupt

    return Interrupt()


def lora_parameter_count(config: dict, r: int) -> int:
    """r * (fan_in + fan_out) per targeted linear layer, from the model config."""
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}
    return config["num_hidden_layers"] * sum(r * (fan_in + fan_out) for fan_in, fan_out in shapes.values())


def adapter_tensors(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_cpu_backend_trains_qlora_on_a_4bit_base(tiny_trained):
    seen = tiny_trained["model"]   # the model the trainer actually trained, probed at on_train_begin
    assert len(seen["linear4bit"]) == N_LAYERS * len(TARGET_MODULES)
    assert all(name.endswith("_proj.base_layer") for name in seen["linear4bit"])
    assert seen["storage_dtypes"] == {"torch.uint8"}   # packed 4-bit weights, not a 16-bit copy
    assert seen["quant_types"] == {"nf4"} and seen["compute_dtypes"] == {"torch.float32"}
    assert seen["trainable"] and all(".lora_A." in name or ".lora_B." in name for name in seen["trainable"])
    # One example per row: padded with an attention mask, as before packing existed; no KV cache.
    assert seen["use_cache"] is False and len(seen["forward_kwargs"]) == 6
    assert all({"input_ids", "labels", "attention_mask"} <= set(keys) and "position_ids" not in keys
               and ROWS_KEY not in keys for keys in seen["forward_kwargs"])


def test_training_writes_the_adapter_and_a_full_curve(tiny_trained, tiny_base, tiny_data):
    adapter, result = tiny_trained["adapter"], tiny_trained["result"]
    metrics, curve = result["metrics"], result["curve"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], set(config["target_modules"])) == (4, 8, set(TARGET_MODULES))
    # sorted, not in the order of PEFT's set (which Python's string hashing changes from process to process)
    assert config["target_modules"] == sorted(TARGET_MODULES)
    tensors = adapter_tensors(adapter)
    assert len(tensors) == 2 * N_LAYERS * len(TARGET_MODULES)
    assert all(tensor.abs().max() > 0 for name, tensor in tensors.items() if "lora_B" in name)   # zero at init

    assert [row["step"] for row in curve] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(row["loss"]) and 0 < row["loss_tokens"] < row["useful_tokens"] <= row["tokens"]
               for row in curve)
    stats = read_json(tiny_data[1] / "stats.json")["train"]   # 6 steps of 4 = one epoch: each row once
    assert sum(row["useful_tokens"] for row in curve) == stats["tokens"]
    # Rows of different lengths padded to the longest of their batch: some positions are padding.
    assert sum(row["tokens"] for row in curve) > stats["tokens"]
    assert metrics["useful_token_share"] == pytest.approx(
        sum(r["useful_tokens"] for r in curve[1:]) / sum(r["tokens"] for r in curve[1:]), abs=1e-4)
    assert sum(row["loss_tokens"] for row in curve) == stats["loss_tokens"]

    model_config = read_json(tiny_base / "config.json")
    assert metrics["backend"] == "cpu" and metrics["compute_dtype"] == "float32"
    assert (metrics["steps"], metrics["resumed_from"]) == (6, None)
    assert metrics["final_loss"] == curve[-1]["loss"]
    assert metrics["train_loss"] == pytest.approx(sum(row["loss"] for row in curve) / 6)
    assert metrics["trainable_parameters"] == lora_parameter_count(model_config, 4)
    assert metrics["run_fingerprint"] == cpu_fingerprint(TRAIN, tiny_base, tiny_data[1])
    assert metrics["reused_completed_run"] is False
    assert metrics["tokens_per_s"] > 0
    assert metrics["lora_target_modules"] == sorted(TARGET_MODULES) == sorted(config["target_modules"])

    checkpoints = tiny_trained["checkpoints"] / metrics["run_fingerprint"]
    assert sorted(path.name for path in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6",
                                                                   "completed", "run.json"]
    assert read_json(checkpoints / "completed" / "result.json")["metrics"] == metrics
    assert adapter_tensors(checkpoints / "completed").keys() == adapter_tensors(adapter).keys()
    lines = curve_csv(curve).splitlines()
    assert lines[0] == ",".join(CURVE_COLUMNS) and len(lines) == 7


def test_each_step_is_logged_once_the_next_steps_pass_has_begun_or_before_its_checkpoint(tiny_trained):
    # The GPU runs the next step's first pass while the host logs a step (ftpipe/model/step_figures.py). One pass
    # a step; checkpoints every 2 steps: their trainer state must hold the step's log, so those steps log first.
    assert tiny_trained["model"]["logged_after_passes"] == [(1, 2), (2, 2), (3, 4), (4, 4), (5, 6), (6, 6)]
    checkpoints = tiny_trained["checkpoints"] / tiny_trained["result"]["metrics"]["run_fingerprint"]
    for step in (2, 4, 6):
        history = read_json(checkpoints / f"checkpoint-{step}" / "trainer_state.json")["log_history"]
        assert [entry["step"] for entry in history if "loss" in entry] == list(range(1, step + 1))
    curve = tiny_trained["result"]["curve"]
    assert all(row["seconds"] > 0 and row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds"], rel=1e-3)
               for row in curve)


def test_all_linear_trains_the_same_adapter_as_the_explicit_llama_list(tmp_path, tiny_base, tiny_data, tiny_trained,
                                                                      capsys):
    """params.yaml's default [all-linear] resolves, on the Llama default model, to the seven names the tests (and
    params.yaml before it) list: the same LoRA layers and initialization, so the same curve and adapter."""
    params = dataclasses.replace(TRAIN, lora=dataclasses.replace(TRAIN.lora, target_modules=["all-linear"]))
    result = train_tiny(params, tiny_base, tiny_data[1], tmp_path / "checkpoints", tmp_path / "adapter")
    assert "train: LoRA on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj " \
           "(train.lora.target_modules: [all-linear])" in capsys.readouterr().out
    reference = tiny_trained["result"]
    assert result["metrics"]["lora_target_modules"] == reference["metrics"]["lora_target_modules"]
    assert [row["loss"] for row in result["curve"]] == [row["loss"] for row in reference["curve"]]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(TARGET_MODULES) and config.get("exclude_modules") is None
    tensors, reference_tensors = adapter_tensors(tmp_path / "adapter"), adapter_tensors(tiny_trained["adapter"])
    assert tensors.keys() == reference_tensors.keys()
    assert all(bool((tensors[k] == reference_tensors[k]).all()) for k in reference_tensors)


def test_micro_batches_and_recomputation_train_the_numbers_of_the_whole_batch(tmp_path, tiny_base, tiny_data,
                                                                              tiny_trained, capsys):
    """train.batch_size sets a step's numbers; micro-batches of 2 rows (accumulated) with every layer recomputed
    follow the same curve to the same adapter as whole batches of 4 without recomputation (float32 on the CPU: up
    to the order of the sums)."""
    import torch

    params = dataclasses.replace(TRAIN, micro_batch_size=2, gradient_checkpointing="on")
    result = train_tiny(params, tiny_base, tiny_data[1], tmp_path / "checkpoints", tmp_path / "adapter")
    assert "train: plan: micro-batch 2 x 2 accumulated, 2 of 2 decoder layers recomputed (on the CPU: as " \
           "params.yaml sets it" in capsys.readouterr().out
    plan = result["metrics"]["training_plan"]
    assert plan["final"] == {"micro_batch_size": 2, "recomputed": N_LAYERS, "offloaded": 0, "layers": N_LAYERS,
                             "kept": 0, "gradient_accumulation": 2}
    assert [entry["step"] for entry in plan["history"]] == [0]
    reference = tiny_trained["result"]
    assert tiny_trained["result"]["metrics"]["training_plan"]["final"]["micro_batch_size"] == TRAIN.batch_size
    assert [row["loss"] for row in result["curve"]] == pytest.approx([row["loss"] for row in reference["curve"]],
                                                                     rel=1e-4)
    assert [row["useful_tokens"] for row in result["curve"]] == [row["useful_tokens"] for row in reference["curve"]]
    tensors, reference_tensors = adapter_tensors(tmp_path / "adapter"), adapter_tensors(tiny_trained["adapter"])
    for name, tensor in reference_tensors.items():
        torch.testing.assert_close(tensors[name], tensor, rtol=1e-3, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, tiny_base, tiny_data):
    """Train with TRAIN params, interrupted after step 3 (checkpoint-2 saved), then rerun."""
    root = tmp_path_factory.mktemp("resume")
    with pytest.raises(KeyboardInterrupt):
        train_tiny(TRAIN, tiny_base, tiny_data[1], root / "checkpoints", root / "interrupted",
                   callbacks=[interrupt_at(3)])
    (run_dir,) = (root / "checkpoints").iterdir()
    left = {"checkpoints": sorted(path.name for path in run_dir.iterdir()),
            "adapter_files": list((root / "interrupted").iterdir())}
    result = train_tiny(TRAIN, tiny_base, tiny_data[1], root / "checkpoints", root / "adapter")
    return {"root": root, "left": left, "result": result}


def test_interrupted_run_leaves_only_its_checkpoint(resumed):
    assert resumed["left"] == {"checkpoints": ["checkpoint-2", "run.json"], "adapter_files": []}


def test_rerun_resumes_and_ends_where_an_uninterrupted_run_ends(resumed, tiny_trained):
    metrics, curve = resumed["result"]["metrics"], resumed["result"]["curve"]
    reference = tiny_trained["result"]   # same params, base and data, never interrupted
    assert metrics["resumed_from"] == "checkpoint-2"
    # the interrupted process started the folder: the resumed run names it (and its MLflow run) as its start
    assert resumed["result"]["start"]["resumed_from_checkpoint"] == "checkpoint-2"
    assert resumed["result"]["start"]["pid"] == __import__("os").getpid()
    assert metrics["steps"] == 6 and [row["step"] for row in curve] == [1, 2, 3, 4, 5, 6]
    assert metrics["run_fingerprint"] == reference["metrics"]["run_fingerprint"]
    # CPU training here is deterministic (seeded LoRA init, data order and RNG state restored from the
    # checkpoint): the measured difference of the final losses is exactly 0.0. Allow float noise only.
    assert abs(metrics["final_loss"] - reference["metrics"]["final_loss"]) <= 1e-5
    assert [row["loss"] for row in curve] == pytest.approx([row["loss"] for row in reference["curve"]], abs=1e-5)
    assert metrics["train_loss"] == pytest.approx(reference["metrics"]["train_loss"], abs=1e-5)
    # Each step is credited with the tokens of its own batch, also across the resume.
    assert [(row["tokens"], row["useful_tokens"], row["loss_tokens"]) for row in curve] == \
        [(row["tokens"], row["useful_tokens"], row["loss_tokens"]) for row in reference["curve"]]
    resumed_tensors, reference_tensors = adapter_tensors(resumed["root"] / "adapter"), \
        adapter_tensors(tiny_trained["adapter"])
    assert resumed_tensors.keys() == reference_tensors.keys()
    assert all((resumed_tensors[k] - reference_tensors[k]).abs().max() <= 1e-6 for k in reference_tensors)


def test_changed_params_start_over_and_keep_the_other_runs_checkpoints(tmp_path, tiny_base, tiny_data, tiny_trained,
                                                                        capsys):
    old_id = tiny_trained["result"]["metrics"]["run_fingerprint"]
    root = tmp_path / "checkpoints"
    shutil.copytree(tiny_trained["checkpoints"], root)
    changed = dataclasses.replace(TRAIN, learning_rate=TRAIN.learning_rate / 2)
    new_id = cpu_fingerprint(changed, tiny_base, tiny_data[1])
    assert new_id != old_id

    result = train_tiny(changed, tiny_base, tiny_data[1], root, tmp_path / "adapter")
    assert result["metrics"]["run_fingerprint"] == new_id and result["metrics"]["resumed_from"] is None
    assert sorted(path.name for path in root.iterdir()) == sorted([new_id, old_id])   # the old run's are kept
    assert result["curve"][-1]["loss"] != tiny_trained["result"]["curve"][-1]["loss"]

    # Going back to the old params finds that run finished: nothing is trained, both runs stay kept.
    began = train_began()
    again = train_tiny(TRAIN, tiny_base, tiny_data[1], root, tmp_path / "adapter-again", [began])
    assert began.count == 0 and again["metrics"]["run_fingerprint"] == old_id
    assert sorted(path.name for path in root.iterdir()) == sorted([new_id, old_id])

    # Beyond train.checkpoint_runs_kept, the oldest other runs are removed, each with a log line.
    capsys.readouterr()
    dropped = dataclasses.replace(TRAIN, learning_rate=TRAIN.learning_rate / 4, checkpoint_runs_kept=0)
    train_tiny(dropped, tiny_base, tiny_data[1], root, tmp_path / "adapter-dropped")
    assert [path.name for path in root.iterdir()] == [cpu_fingerprint(dropped, tiny_base, tiny_data[1])]
    log = capsys.readouterr().out
    assert f"removed the checkpoints of run {old_id}" in log and f"removed the checkpoints of run {new_id}" in log


def test_a_rerun_of_a_completed_run_publishes_its_adapter_without_training(tmp_path, tiny_base, tiny_data,
                                                                          tiny_trained):
    """The stage reruns for reasons that change no number (a helper module edited): the run with the same
    fingerprint finished, so its adapter and result are published again and nothing is trained."""
    root = tmp_path / "checkpoints"
    shutil.copytree(tiny_trained["checkpoints"], root)
    began = train_began()
    result = train_tiny(TRAIN, tiny_base, tiny_data[1], root, tmp_path / "adapter", [began])
    reference = tiny_trained["result"]
    assert began.count == 0
    assert result["metrics"] == {**reference["metrics"], "reused_completed_run": True}
    assert result["curve"] == reference["curve"]
    tensors, reference_tensors = adapter_tensors(tmp_path / "adapter"), adapter_tensors(tiny_trained["adapter"])
    assert all(bool((tensors[k] == reference_tensors[k]).all()) for k in reference_tensors)


def test_a_finished_run_without_its_record_trains_again_to_the_same_adapter(tmp_path, tiny_base, tiny_data,
                                                                            tiny_trained):
    """Killed after its last checkpoint but before its completed/ record: the last checkpoint must not be
    resumed (the trainer would take a 7th step of 6) but trained again, to the same result."""
    root = tmp_path / "checkpoints"
    shutil.copytree(tiny_trained["checkpoints"], root)
    shutil.rmtree(root / tiny_trained["result"]["metrics"]["run_fingerprint"] / "completed")
    result = train_tiny(TRAIN, tiny_base, tiny_data[1], root, tmp_path / "adapter")
    reference = tiny_trained["result"]
    assert (result["metrics"]["steps"], result["metrics"]["resumed_from"]) == (6, None)
    assert [row["loss"] for row in result["curve"]] == [row["loss"] for row in reference["curve"]]
    tensors, reference_tensors = adapter_tensors(tmp_path / "adapter"), adapter_tensors(tiny_trained["adapter"])
    assert all(bool((tensors[k] == reference_tensors[k]).all()) for k in reference_tensors)



def test_importing_the_train_stage_imports_neither_unsloth_nor_transformers():
    """On the CPU, Unsloth is never imported; and since it must be imported before transformers, peft and
    trl on a GPU, importing the stage (and resolving the backend) must not import those either."""
    code = ("import sys, stages.train as t; t.resolve_backend('auto'); "
            "print(sorted(m for m in ('unsloth', 'transformers', 'peft', 'trl') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert done.stdout.strip() == "[]"



@pytest.fixture(scope="module")
def packed_trained(tmp_path_factory, tiny_base) -> dict:
    """One epoch of QLoRA on the packed form of the tiny data set."""
    root = tmp_path_factory.mktemp("packed")
    _, tokenized_dir = build_tokenized(tiny_base, root, PACKED_TOKENIZE)
    params = dataclasses.replace(TRAIN, max_steps=None, num_epochs=1.0)
    probe = model_probe()
    result = train_tiny(params, tiny_base, tokenized_dir, root / "checkpoints", root / "adapter", [probe])
    return {"result": result, "model": probe.seen, "tokenized": tokenized_dir, "adapter": root / "adapter"}


def test_training_on_packed_rows_end_to_end(packed_trained):
    metrics, curve = packed_trained["result"]["metrics"], packed_trained["result"]["curve"]
    rows = load_tokenized("train", packed_trained["tokenized"])
    stats = read_json(packed_trained["tokenized"] / "stats.json")["train"]
    assert "position_ids" in rows[0] and stats["packed_rows"] == len(rows) < stats["examples"] == 24
    steps = math.ceil(len(rows) / TRAIN.batch_size)   # one epoch
    assert metrics["packed"] is True and metrics["steps"] == steps and [row["step"] for row in curve] == \
        list(range(1, steps + 1))
    assert all(math.isfinite(row["loss"]) and 0 < row["loss_tokens"] < row["useful_tokens"] <= row["tokens"]
               for row in curve)
    # Every example trained once, its real tokens counted and padding not: the tokenize stage's totals.
    assert sum(row["useful_tokens"] for row in curve) == stats["tokens"]
    assert sum(row["loss_tokens"] for row in curve) == stats["loss_tokens"]
    seen = packed_trained["model"]
    assert seen["use_cache"] is False and len(seen["forward_kwargs"]) == steps
    assert all({"input_ids", "labels", "position_ids"} <= set(keys) and "attention_mask" not in keys
               and ROWS_KEY not in keys for keys in seen["forward_kwargs"])
    tensors = adapter_tensors(packed_trained["adapter"])
    assert all(tensor.abs().max() > 0 for name, tensor in tensors.items() if "lora_B" in name)


def test_the_stage_resumes_a_killed_run_and_says_so_in_mlflow(in_tmp_project, tiny_base, tiny_data):
    """main() on a project whose last train run was interrupted after checkpoint-2: the MLflow run names the
    checkpoint and the run it resumed; run totals are logged under run/ names, apart from per-step ones."""
    import yaml
    from mlflow.tracking import MlflowClient

    from ftpipe.tracking.runs import tracking_uri
    from stages.train import main

    shutil.copytree(tiny_base, in_tmp_project / "models/base")
    shutil.copytree(tiny_data[1], in_tmp_project / "data/tokenized")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tokenize"]["max_seq_length"] = TOKENIZE.max_seq_length
    params["train"] = dataclasses.asdict(TRAIN)   # TRAIN exactly: the fingerprint of train_tiny's run
    (in_tmp_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(KeyboardInterrupt):
        train_tiny(TRAIN, in_tmp_project / "models/base", in_tmp_project / "data/tokenized",
                   in_tmp_project / "models/checkpoints", in_tmp_project / "interrupted", [interrupt_at(3)])
    main()
    client = MlflowClient(tracking_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("ftpipe").experiment_id],
                                "tags.`ftpipe.stage` = 'train'")
    assert run.data.tags["ftpipe.resumed"] == "true"
    assert run.data.tags["ftpipe.resumed_from_checkpoint"] == "checkpoint-2"
    assert run.data.tags["ftpipe.resumed_from_run"] == "None"   # train_tiny started it without MLflow
    assert "run/seconds" in run.data.metrics and "final_loss" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 6   # per step, also those before the resume
    assert all(point.step > 0 for point in client.get_metric_history(run.info.run_id, "seconds"))
    assert read_json(in_tmp_project / "metrics/train.json")["resumed_from"] == "checkpoint-2"
    # the plan the steps ran with, and why, beside the numbers
    assert run.data.tags["train.plan"] == "micro-batch 4 (the whole batch), no recomputation"
    assert run.data.tags["train.plan.micro_batch_size"] == "4"
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "train/training_plan.json",
                                                       str(in_tmp_project))).read_text())
    assert logged["history"][0]["reason"].startswith("on the CPU: as params.yaml sets it")
