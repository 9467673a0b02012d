"""The Ray edge without Ray: a worker's error re-raised on the driver as one line with its key once."""

from __future__ import annotations

import pytest

from lorasum.cluster import reraise
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
