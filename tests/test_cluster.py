"""The Ray edge without a Ray runtime: a worker's error re-raised on the driver as one line with its key once; the
resources each worker asks for on the CPU and on a GPU; an --address where a plain TCP or HTTP server listens refused
within seconds by the gRPC handshake probe."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time

import pytest

from lorasum.cluster import _probe, is_loopback, reraise, uses_gpu, worker_resources
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
# --- an --address where something other than a Ray head listens ----------------------------------------------------
@contextlib.contextmanager
def http_server():
    """A real HTTP/1 server on 127.0.0.1 (Python's http.server); yields its port."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def _silent_server():
    from conftest import socket_server

    return socket_server(None)  # accepts and says nothing


@pytest.mark.parametrize("server,culprit", [
    (_silent_server, "not a Ray head (a server listens there but sent nothing within 3 s of a gRPC handshake)"),
    (http_server, "not a Ray head (it does not answer a gRPC handshake: "),
])
def test_an_address_that_is_not_a_ray_head_is_refused_within_seconds(server, culprit, tmp_path, run_cli):
    pytest.importorskip("ray", reason="the Ray extra is not installed")
    from conftest import color_rows, one_line_error, write_jsonl

    write_jsonl(tmp_path / "data" / "colors.jsonl", color_rows(20))
    with server() as port:
        t0 = time.monotonic()
        result = run_cli("tune", "--model", "tiny-gpt2", "--data-dir", tmp_path / "data", "--data", "colors",
                         "--trials", "1", "--out", tmp_path / "out", "--executor", "ray", "--storage",
                         "postgresql://u@127.0.0.1:1/db", "--address", f"127.0.0.1:{port}")
        took = time.monotonic() - t0
    err = one_line_error(result, absent=tmp_path / "out")
    assert err.startswith(f"lorasum: error: --address 127.0.0.1:{port}: {culprit}"), err
    assert took < 10, took


def test_a_grpc_speaking_address_passes_the_probe():
    from conftest import H2_SETTINGS_FRAME, socket_server

    with socket_server(H2_SETTINGS_FRAME) as port:
        _probe(f"127.0.0.1:{port}")  # no error: this is how a Ray head's GCS answers (tests/test_executors.py: a real one)


@pytest.mark.parametrize("address,loopback", [("127.0.0.1:6379", True), ("127.8.0.1:1", True), ("localhost:1", True),
                                              ("[::1]:6379", True), ("192.0.2.2:6379", False), ("head:1", False)])
def test_loopback_addresses_are_recognised(address, loopback):
    assert is_loopback(address) is loopback
