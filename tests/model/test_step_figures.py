"""A step's figures taken when its kernels are queued and read later (ftpipe/model/step_figures.py), on the CPU.
The GPU path (pinned copy, CUDA event) runs in bench/gpu_train_plan.py's stage jobs."""
import time

import pytest
import torch

from ftpipe.model.step_figures import StepFigures


def test_figures_are_a_copy_taken_when_the_step_ended():
    loss_sum = torch.tensor(12.5)
    norm = torch.tensor(0.7734375, dtype=torch.bfloat16)
    figures = StepFigures({"loss": loss_sum, "grad_norm": norm, "learning_rate": 2e-4}, "cpu")
    loss_sum -= loss_sum   # the trainer zeroes its loss sum in place once the step is taken
    assert figures.read() == {"loss": 12.5, "grad_norm": norm.item(), "learning_rate": 2e-4}


def test_a_step_is_timed_from_the_end_of_the_one_before():
    began = StepFigures({}, "cpu")
    assert began.read() == {}
    time.sleep(0.02)
    ended = StepFigures({"loss": torch.tensor(1.0)}, "cpu")
    assert ended.seconds_after(began) == pytest.approx(ended.clock - began.clock)
    assert 0.02 <= ended.seconds_after(began) < 1
