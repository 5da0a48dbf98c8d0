"""Stage `merge`: the adapter folded into a 16-bit copy of the tiny base matches the adapter's loss;
a gap over its tolerance fails with a message naming it and its params key, and publishes nothing."""
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import file_hashes, read_json, tree_digest, write_content_record
from ftpipe.core.params import MergeParams
from ftpipe.data.tokenized import load_tokenized
from ftpipe.model.modeling import load_model, load_tokenizer, mean_loss
from stages.merge import check_parity
from tests.model_fixtures import TARGET_MODULES, TRAIN

PARAMS_YAML = Path(__file__).resolve().parents[2] / "params.yaml"
PARAMS = MergeParams(max_loss_gap_vs_adapter=0.02, max_loss_gap_vs_trained=0.05)   # as in params.yaml


def load_safetensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def validation_rows(tiny_data) -> list[dict]:
    return load_tokenized("validation", tiny_data[1])


@pytest.fixture(scope="module")
def parity(tiny_base, tiny_trained, tiny_merged, validation_rows) -> dict:
    return check_parity(PARAMS, TRAIN.quantization, tiny_base, tiny_trained["adapter"], tiny_merged, validation_rows)


def test_merged_folder_is_a_16bit_model_with_the_base_tokenizer(tiny_base, tiny_merged):
    import torch

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        assert (tiny_merged / name).is_file(), name
    assert (tiny_merged / "chat_template.jinja").read_text() == (tiny_base / "chat_template.jinja").read_text()
    assert (tiny_merged / "tokenizer.json").read_text() == (tiny_base / "tokenizer.json").read_text()
    assert json.loads((tiny_merged / "config.json").read_text())["dtype"] == "bfloat16"
    assert not (tiny_merged / "adapter_config.json").exists()

    merged, base = load_safetensors(tiny_merged), load_safetensors(tiny_base)
    assert merged.keys() == base.keys()   # plain Llama weights, no LoRA leftovers
    for name, tensor in merged.items():
        assert tensor.dtype == base[name].dtype == torch.bfloat16
        if name.split(".")[-2] in TARGET_MODULES:
            assert not tensor.equal(base[name]), f"{name}: the adapter was not merged into it"
        else:
            assert tensor.equal(base[name]), f"{name}: not a LoRA target, must be untouched"


def test_merged_model_loads_and_matches_the_adapter(parity, tiny_base, tiny_merged, validation_rows):
    import torch

    model = load_model(tiny_merged, "float32")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    losses = parity["validation_loss"]
    assert set(losses) == {"adapter_16bit", "adapter_as_trained", "merged"}
    assert all(math.isfinite(loss) for loss in losses.values())
    assert parity["gap_vs_adapter"] == abs(losses["merged"] - losses["adapter_16bit"]) < 0.005   # bf16 rounding
    assert parity["gap_vs_trained"] == losses["merged"] - losses["adapter_as_trained"] < PARAMS.max_loss_gap_vs_trained
    assert losses["merged"] == pytest.approx(
        mean_loss(model, validation_rows, load_tokenizer(tiny_merged).pad_token_id, 16, "merged")["loss"])
    base_loss = mean_loss(load_model(tiny_base, "float32"), validation_rows, 2, 16, "base")["loss"]
    assert losses["merged"] < base_loss - 0.01   # the merge carries what the adapter learned


def test_gaps_over_their_tolerances_name_each_gap_and_its_key(parity, tiny_base, tiny_trained, tiny_merged,
                                                              validation_rows):
    # only a gap of exactly 0 meets these
    params = MergeParams(max_loss_gap_vs_adapter=0.0, max_loss_gap_vs_trained=0.0)
    with pytest.raises(PipelineError) as error:
        check_parity(params, TRAIN.quantization, tiny_base, tiny_trained["adapter"], tiny_merged, validation_rows)
    lines = str(error.value).splitlines()
    losses = {name: f"{loss:.4f}" for name, loss in parity["validation_loss"].items()}
    assert lines[1] == (f"  gap_vs_adapter: {losses['merged']} (merged) vs {losses['adapter_16bit']} (adapter_16bit): "
                        f"gap {parity['gap_vs_adapter']:.4f} > merge.max_loss_gap_vs_adapter = 0.0")
    assert lines[2] == (f"  gap_vs_trained: {losses['merged']} (merged) vs {losses['adapter_as_trained']} "
                        f"(adapter_as_trained): gap {parity['gap_vs_trained']:.4f} "
                        "> merge.max_loss_gap_vs_trained = 0.0")
    assert "The merged model was not published" in str(error.value)


def write_project(root: Path, base: Path, adapter: Path, tokenized: Path, merge: dict) -> None:
    """A project folder for stages.merge.main(): params.yaml and the outputs of the earlier stages."""
    params = yaml.safe_load(PARAMS_YAML.read_text(encoding="utf-8"))
    params["merge"] = merge
    params["base"]["dtype"] = "bfloat16"
    params["train"]["quantization"] = {"quant_type": TRAIN.quantization.quant_type,
                                       "double_quant": TRAIN.quantization.double_quant,
                                       "compute_dtype": TRAIN.quantization.compute_dtype}
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    shutil.copytree(base, root / "models" / "base")
    shutil.copytree(adapter, root / "models" / "adapter")
    shutil.copytree(tokenized, root / "data" / "tokenized")
    if not (root / "models" / "adapter" / "content.json").exists():   # the train stage writes it
        write_content_record(root / "models" / "adapter")
    for stage_dir in ("data/evaluation", "data/audit"):   # both gates passed, for this adapter
        write_verdict(root / stage_dir, True)


def write_verdict(folder: Path, passed: bool) -> None:
    from ftpipe.evaluation.gates import VERDICT_FILE, adapter_subject

    folder.mkdir(parents=True, exist_ok=True)
    (folder / VERDICT_FILE).write_text(json.dumps({"passed": passed, "subject": adapter_subject(
        folder.parents[1] / "models" / "adapter")}))


def test_the_stage_refuses_an_adapter_a_gate_stopped(in_tmp_project, tiny_base, tiny_trained, tiny_data):
    from stages.merge import main

    write_project(in_tmp_project, tiny_base, tiny_trained["adapter"], tiny_data[1],
                  {"max_loss_gap_vs_adapter": 0.02, "max_loss_gap_vs_trained": 0.05})
    write_verdict(in_tmp_project / "data" / "audit", False)
    with pytest.raises(PipelineError, match="data/audit/gate.json says the gate failed"):
        main()
    assert not (in_tmp_project / "models" / "merged").exists()


def test_stage_publishes_nothing_on_failure_and_everything_on_success(in_tmp_project, tiny_base, tiny_trained,
                                                                      tiny_data):
    from stages.merge import main

    write_project(in_tmp_project, tiny_base, tiny_trained["adapter"], tiny_data[1],
                  {"max_loss_gap_vs_adapter": 0.0, "max_loss_gap_vs_trained": 0.05})
    previous = in_tmp_project / "models" / "merged"
    previous.mkdir()
    (previous / "model.safetensors").write_text("an earlier merge")

    with pytest.raises(PipelineError, match=r"gap_vs_adapter: .*> merge\.max_loss_gap_vs_adapter = 0\.0") as error:
        main()
    assert "gap_vs_trained: " not in str(error.value)   # within its tolerance: not reported
    assert [path.name for path in previous.iterdir()] == ["model.safetensors"]   # the earlier output is kept
    assert previous.joinpath("model.safetensors").read_text() == "an earlier merge"
    assert sorted(path.name for path in (in_tmp_project / "models").iterdir()) == ["adapter", "base", "merged"]
    assert not (in_tmp_project / "metrics" / "merge.json").exists()

    params = yaml.safe_load((in_tmp_project / "params.yaml").read_text())
    params["merge"] = {"max_loss_gap_vs_adapter": 0.02, "max_loss_gap_vs_trained": 0.05}
    (in_tmp_project / "params.yaml").write_text(yaml.safe_dump(params))
    main()
    provenance = read_json(previous / "provenance.json")
    published = file_hashes(previous, exclude=("provenance.json", "content.json"))
    assert provenance["files_sha256"] == published and provenance["digest"] == tree_digest(published)
    # content.json: what quantize depends on (the same hashes, without the run's time stamps)
    assert read_json(previous / "content.json") == {"files_sha256": published, "digest": tree_digest(published)}
    assert provenance["merged_into"]["base_digest"] == read_json(tiny_base / "provenance.json")["digest"]
    assert provenance["adapter_sha256"] == file_hashes(in_tmp_project / "models" / "adapter")
    metrics = read_json(in_tmp_project / "metrics" / "merge.json")
    assert metrics == provenance["metrics"] and metrics["gap_vs_adapter"] < 0.005
    assert sorted(path.name for path in (in_tmp_project / "models").iterdir()) == ["adapter", "base", "merged"]


def test_merged_model_carries_the_tokenize_stage_template_and_the_base_tokenizer_files(tmp_path, tiny_base, tiny_data,
                                                                                       tiny_trained):
    """The template the tokenize stage trained with (here a built-in with a baked system prompt, not the base's own)
    is the merged model's, where transformers and llama.cpp's converter read it; the other tokenizer files are the
    base's, byte for byte."""
    from ftpipe.data.chat_template import BUILTIN_DIR, TEMPLATE_FILE, bake
    from ftpipe.model.modeling import render_chat
    from stages.merge import merge_adapter
    from tests.model_fixtures import BASE_DTYPE

    tokenized = tmp_path / "tokenized"
    shutil.copytree(tiny_data[1], tokenized)
    chosen = bake((BUILTIN_DIR / "chatml.jinja").read_text(), {}, "Answer in one line.")
    (tokenized / TEMPLATE_FILE).write_text(chosen)
    merged = tmp_path / "merged"
    merged.mkdir()
    merge_adapter(tiny_base, tiny_trained["adapter"], BASE_DTYPE, merged, tokenized)

    assert (merged / TEMPLATE_FILE).read_text() == chosen
    assert json.loads((merged / "tokenizer_config.json").read_text())["chat_template"] == chosen
    assert load_tokenizer(merged).chat_template == chosen
    assert render_chat(load_tokenizer(merged), [{"role": "user", "content": "Hi"}]).startswith(
        "<|im_start|>system\nAnswer in one line.<|im_end|>")
    assert (merged / "tokenizer.json").read_bytes() == (tiny_base / "tokenizer.json").read_bytes()
