"""ftpipe/model/distributed.py: how many processes train.devices means, each process's share of a step, and the
torchrun command for one host or several (the runs themselves: tests/stages/test_train_distributed.py)."""
from __future__ import annotations

import sys

import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.model.distributed import per_process_rows, rank, resolve_devices, torchrun_command, world_size


def test_devices_on_the_cpu_are_one_process_unless_a_number_asks_for_more():
    assert resolve_devices("auto", on_gpu=False) == 1
    assert resolve_devices(3, on_gpu=False) == 3


def test_a_batch_the_processes_cannot_share_evenly_names_the_key_and_a_fix():
    assert per_process_rows(16, 4) == 4
    with pytest.raises(PipelineError, match=r"train.batch_size is 6, which 4 processes \(train.devices x hosts\) "
                                            r"cannot share evenly; set it to a multiple of 4, e.g. 8"):
        per_process_rows(6, 4)


def test_one_host_runs_standalone_and_several_leave_the_rendezvous_to_torchruns_pet_variables(monkeypatch):
    for name in ("PET_NNODES", "PET_RDZV_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_command("stages.train", 2) == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   "--nproc_per_node=2", "-m", "stages.train"]
    monkeypatch.setenv("PET_NNODES", "2")
    assert "--standalone" not in torchrun_command("stages.train", 8)


def test_outside_torchrun_a_process_is_rank_0_of_1(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")   # a stray variable alone does not make a rank
    assert (world_size(), rank()) == (1, 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "3")
    assert (world_size(), rank()) == (4, 3)
