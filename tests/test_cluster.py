"""The Ray edge without Ray: a worker's error re-raised on the driver as one line with its key once; the resources
each worker asks for on the CPU and on a GPU."""

from __future__ import annotations

import pytest

from lorasum.cluster import reraise, uses_gpu, worker_resources
from lorasum.errors import LorasumError


class _TaskError(Exception):
    """Ray's RayTaskError carries the worker's exception as `cause`."""

    def __init__(self, cause):
        super().__init__("task failed")
        self.cause = cause


def test_a_workers_keyed_error_names_what_failed_and_its_key_once():
    with pytest.raises(LorasumError) as e:
        reraise(_TaskError(LorasumError("made the training loss nan at step 2", key="lr")), "job train:ab12")
    assert str(e.value) == "job train:ab12: lr made the training loss nan at step 2"
    assert e.value.as_flag() == str(e.value)  # not rewritten as a flag of this command


def test_any_other_worker_error_is_raised_as_itself():
    bug = ZeroDivisionError("boom")
    with pytest.raises(ZeroDivisionError) as e:
        reraise(_TaskError(bug), "job x")
    assert e.value is bug
    plain = RuntimeError("no cause")
    with pytest.raises(RuntimeError) as e:
        reraise(plain, "job x")
    assert e.value is plain


@pytest.mark.parametrize("device, gpu_present, on_gpu", [
    (None, False, False), (None, True, True), ("auto", True, True), ("cpu", True, False), ("cuda", True, True),
    ("cuda:1", True, True), ("cuda", False, True), ("mps", False, False),
])
def test_which_jobs_run_on_a_gpu(device, gpu_present, on_gpu):
    assert uses_gpu(device, gpu_present) is on_gpu


@pytest.mark.parametrize("workers", [1, 2, 3, 7, 8, 64])
def test_gpu_workers_share_one_gpu_and_cpu_workers_ask_for_threads_only(workers):
    cpu = worker_resources("cpu", workers, threads=2, gpu_present=True)
    assert cpu == {"num_cpus": 2}
    assert worker_resources(None, workers, threads=1, gpu_present=False) == {"num_cpus": 1}
    gpu = worker_resources("cuda", workers, threads=2, gpu_present=True)
    assert gpu["num_cpus"] == 2
    share = gpu["num_gpus"]
    assert 0 < share <= 1 and share * workers <= 1  # every worker fits on the one GPU
    assert 1 - share * workers < workers * 1e-4  # and they fill it, up to Ray's 0.0001 resolution
    assert round(share, 4) == share
    assert worker_resources(None, workers, threads=2, gpu_present=True) == gpu  # auto: the GPU when present
