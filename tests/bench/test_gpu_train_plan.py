"""The longest-context search of bench/gpu_train_plan.py (its GPU steps are measured on the GPU machine; the
search's order of trials and its stopping rules are plain logic, checked here with a fake step)."""
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("gpu_train_plan", BENCH / "gpu_train_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def fake_step(longest: int, lengths: list[int]):
    def trial(length: int) -> dict:
        lengths.append(length)
        return {"length": length, "fits": length <= longest}
    return trial


def test_longest_multiple_finds_the_boundary_of_a_predicate():
    assert bench.longest_multiple(lambda n: n <= 100_000, 1024, 1 << 19) == 99_328   # 97 x 1024
    assert bench.longest_multiple(lambda n: True, 1024, 10_000) == 9_216              # bounded by the limit
    assert bench.longest_multiple(lambda n: False, 1024, 10_000) == 0


def test_search_from_a_prediction_that_is_short_grows_then_bisects():
    lengths = []
    found = bench.search_longest(fake_step(50_000, lengths), [40_960], 1024, 1 << 19, [], 3600, lambda t: None)
    assert found["longest_fitting"] == 49_152 and found["shortest_failing"] == 50_176 and found["complete"]
    assert lengths[:4] == [40_960, 41_984, 44_032, 48_128]   # step, 2 step, 4 step above the prediction
    assert all(t["fits"] == (t["length"] <= 50_000) for t in found["trials"])


def test_a_target_that_fails_drops_longer_first_lengths_and_bisects_below():
    lengths = []
    found = bench.search_longest(fake_step(300_000, lengths), [344_064, 400_000], 8192, 1 << 19, [], 3600,
                                 lambda t: None)
    assert lengths[0] == 344_064 and 400_000 not in lengths
    assert found["longest_fitting"] == 294_912 and found["shortest_failing"] == 303_104


def test_a_resumed_search_counts_earlier_trials_and_stops_on_time():
    earlier = [{"length": 344_064, "fits": True}, {"length": 425_984, "fits": False}]
    lengths = []
    found = bench.search_longest(fake_step(400_000, lengths), [344_064], 8192, 1 << 19, earlier, 3600,
                                 lambda t: None)
    assert lengths[0] == 385_024 and found["longest_fitting"] == 393_216 and found["complete"]
    assert found["trials"][:2] == earlier
    assert bench.search_longest(fake_step(400_000, []), [8192], 8192, 1 << 19, [], 0, lambda t: None)["trials"] == []


def test_the_comparison_states_the_issues_targets_from_the_jobs_that_ran():
    plan = {"history": [{"step": 0}, {"step": 3}]}   # one step redone on a smaller plan
    jobs = {"8b-cap24-stage": {"useful_tokens_per_s": 15_000, "tokens_per_s": 15_100, "losses": [1.0, 0.9],
                               "training_plan": plan},
            "8b-cap24-unsloth_default": {"useful_tokens_per_s": 10_000, "losses": [1.0, 0.9004]},
            "8b-longest": {"searches": {"uncapped": {"longest_fitting": 409_600}}},
            "8b-longest-capped": {"searches": {"16 GiB": {"longest_fitting": 40_960},
                                               "8 GiB": {"longest_fitting": 7_168}}},
            "8b-longest-capped-hf_peft_bnb": {"searches": {"8 GiB": {"longest_fitting": 0}}},
            "8b-dense": {"by_micro_batch": {"2": {"speedup": 1.04, "bitwise_identical": True},
                                            "4": {"speedup": 1.02, "bitwise_identical": False}}}}
    out = bench.compare(jobs)
    assert out["8b dense base weights: micro-batch speed-up, and bitwise the same loss and gradients"] == {
        "micro-batch 2": [1.04, True], "micro-batch 4": [1.02, False]}
    assert out["8b-cap24: stage / unsloth_default"] == 1.5   # real tokens, not the padded count
    assert out["8b-cap24: stage steps redone after running out of memory"] == 1
    assert out["8b longest context, whole GPU: stage"] == 409_600
    assert out["8b longest context beyond Unsloth's published 342,733"] is True
    assert out["8b longest context under GPU memory caps"] == {
        "8 GiB": {"stage": 7_168, "transformers + peft + bnb": 0}, "16 GiB": {"stage": 40_960}}


def test_a_trial_that_runs_out_of_memory_falls_back_as_the_stage_does_until_a_plan_fits():
    # plans as numbers of layers offloaded; a step fits from 3 offloaded on
    tried = []

    def attempt(plan):
        tried.append(plan)
        return {"fits": plan >= 3, "plan": plan}

    record = bench.step_with_fallbacks(344_064, 1, attempt, lambda plan: plan + 1 if plan < 5 else None)
    assert tried == [1, 2, 3]
    assert record["fits"] and record["plan"] == 3 and record["length"] == 344_064
    assert [a["fits"] for a in record["attempts"]] == [False, False, True]


def test_a_trial_fails_only_when_no_plan_is_left():
    record = bench.step_with_fallbacks(8192, 4, lambda plan: {"fits": False, "plan": plan},
                                       lambda plan: plan + 1 if plan < 5 else None)
    assert not record["fits"] and [a["plan"] for a in record["attempts"]] == [4, 5]


def test_the_comparison_counts_the_variable_length_stages_redone_steps():
    history = [{"step": 0}, {"step": 1}, {"step": 1}]
    jobs = {"8b-variable-stage": {"useful_tokens_per_s": 12_000.0, "losses": [1.0, 0.9],
                                  "training_plan": {"history": history}},
            "8b-variable-unsloth_loop": {"tokens_per_s": 11_800.0, "losses": [1.0, 0.91]}}
    comparison = bench.compare(jobs)
    assert comparison["8b-variable: stage steps redone after running out of memory"] == 2
    ratio = comparison["8b variable-length: stage / hand-written loop with the stage's plan"]
    assert ratio == round(12_000 / 11_800, 3)


def test_jobs_run_in_the_order_named_each_once_a_name_before_a_prefix():
    names = [job["name"] for job in bench.selected_jobs("8b-longest,8b-cap,8b-longest-c,8b-cap24-stage")]
    assert names == ["8b-longest", "8b-cap24-stage", "8b-cap24-unsloth_default", "8b-cap48-stage",
                     "8b-cap48-unsloth_default", "8b-longest-capped", "8b-longest-capped-hf_peft_bnb"]
    assert [job["name"] for job in bench.selected_jobs("8b-longest-capped")] == ["8b-longest-capped"]
    assert [job["name"] for job in bench.selected_jobs("1b-u")] == ["1b-unsloth_default", "1b-unsloth_best"]


def test_a_long_row_is_one_example_every_position_a_target_the_same_for_a_seed():
    [row] = bench.one_long_row(5, seed=0)
    assert row["position_ids"] == [0, 1, 2, 3, 4] and row["labels"] == row["input_ids"]
    assert all(3 <= token < 32000 for token in row["input_ids"])
    assert bench.one_long_row(5, seed=0) == [row] and bench.one_long_row(5, seed=1) != [row]


def test_the_default_settings_give_every_methods_train_params():
    """gpu_longest_memory.py trains with the bench's default settings: the parser's, read as train_params reads."""
    args = bench.argument_parser().parse_args([])
    params = bench.train_params(args, {"steps": 1}, "auto", 1)
    assert (params.batch_size, params.micro_batch_size, params.max_steps, params.backend) == (16, 1, 1, "unsloth")
    assert params.gradient_checkpointing == "auto" and params.lora.r == 16 and params.seed == bench.SEED
    assert bench.train_params(args, {}, "off", 8).max_steps == 1   # jobs without steps (profile, dense_check)


def test_a_wait_returns_on_a_job_failing_after_it_began_not_on_an_earlier_failure(tmp_path, monkeypatch):
    import json
    import tarfile

    monkeypatch.setenv("FTPIPE_TRAIN_PLAN_ROOT", str(tmp_path / "root"))
    report_file = tmp_path / "root/gpu_train_plan.json"
    report_file.parent.mkdir()
    report = {"state": "running", "jobs": {"8b-dense": {"exit": 1}, "8b-cap24-stage": {"exit": 0}}}
    report_file.write_text(json.dumps(report))
    sleeps = []

    def sleep(seconds):   # the runner goes on while the wait sleeps: the next job fails
        sleeps.append(seconds)
        report["jobs"][f"job-{len(sleeps)}"] = {"exit": 1 if len(sleeps) == 2 else 0}
        report_file.write_text(json.dumps(report))

    monkeypatch.setattr(bench.time, "sleep", sleep)
    bench.wait(600, tmp_path / "out")
    assert len(sleeps) == 2   # not at once on 8b-dense's earlier failure; at once on job-2's
    assert json.loads((tmp_path / "out/gpu_train_plan.json").read_text())["jobs"]["job-2"] == {"exit": 1}
    with tarfile.open(tmp_path / "out/jobs.tar.gz") as archive:
        assert archive.getnames() == []


def test_a_start_marks_the_last_runs_report_so_a_wait_does_not_return_on_it(tmp_path, monkeypatch):
    """The runner writes its report after its first job: until then a wait read the last run's "done" and returned
    at once, and the device machine, idle, was given back with the run under way."""
    import json

    monkeypatch.setenv("FTPIPE_TRAIN_PLAN_ROOT", str(tmp_path / "root"))
    (tmp_path / "root").mkdir()
    report_file = tmp_path / "root/gpu_train_plan.json"
    report_file.write_text(json.dumps({"state": "done", "jobs": {"8b-stage": {"exit": 0}}}))
    started = []
    monkeypatch.setattr(bench.subprocess, "Popen", lambda command, **kwargs: started.append(command))
    bench.start(bench.argument_parser().parse_args(["--start", "--jobs", "8b-cap24"]))
    assert started and "--run" in started[0]
    assert json.loads(report_file.read_text()) == {"state": "starting", "jobs": {"8b-stage": {"exit": 0}}}

