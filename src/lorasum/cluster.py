"""How lorasum reaches Ray: the executor options (runtime choices, never part of a config or its results), the
checks that refuse bad ones before any work, and the connection to a local runtime or an existing cluster.

A local runtime is pinned to 127.0.0.1 (Ray otherwise advertises the machine's outward address), with usage
statistics off and token authentication chosen explicitly. A loopback `--address` stays loopback: Ray would swap
127.0.0.1 for the machine's outward address before connecting, so the driver is pinned to loopback too. Before Ray
retries for a minute, `_probe` checks within seconds that the address speaks gRPC's HTTP/2, as a Ray head does. Ray
is an optional extra: `pip install 'lorasum[ray]'`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import NoReturn

from .errors import LorasumError
from .schema import check_count

EXECUTORS = ("serial", "ray")
MAX_WORKERS = 4096  # worker processes: more than any cluster lorasum targets, and each loads the model
RETRIES = 3  # work whose Ray worker died is started again elsewhere this many times
_NO_RAY = "ray needs Ray installed: pip install 'lorasum[ray]' (or pip install ray) on the driver and every node"


@dataclass(frozen=True)
class ExecutorOptions:
    """How to run the jobs (not what they compute)."""

    kind: str = "serial"
    workers: int | None = None  # ray: worker processes (default: the cluster's CPUs ÷ threads per job)
    address: str | None = None  # ray: join this cluster (HOST:PORT) instead of starting a local one
    threads: int | None = None  # ray: torch threads per job when the config leaves them to torch (default 1)

    def check(self) -> None:
        if self.kind not in EXECUTORS:
            raise LorasumError(f"must be one of {', '.join(EXECUTORS)}, got {self.kind!r}", key="executor")
        if self.workers is not None:
            check_count(self.workers, "workers", MAX_WORKERS)
        if self.kind == "serial" and (self.workers is not None or self.address):
            raise LorasumError("--workers and --address apply to --executor ray only", key="executor")
        if self.address is not None:
            host, _, port = self.address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise LorasumError(f"must be HOST:PORT (e.g. 127.0.0.1:6379), got {self.address!r}", key="address")
        if self.kind == "ray":
            try:
                found = importlib.util.find_spec("ray") is not None
            except ValueError:  # a module entry without a spec (e.g. blocked in sys.modules)
                found = False
            if not found:
                raise LorasumError(_NO_RAY, key="executor")
            if self.address is not None:
                _probe(self.address)


LOCAL_ENV = {"RAY_USAGE_STATS_ENABLED": "0",  # no usage reports
             "RAY_AUTH_MODE": "token",  # token authentication, chosen explicitly (Ray warns when left implicit)
             "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # a local runtime: every component on the loopback address


LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # Ray resolves "127.0.0.1" to 127.0.0.1, not outward


def is_loopback(address: str) -> bool:
    """Whether HOST:PORT names this machine's loopback interface (localhost, 127.x.x.x, ::1)."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def import_ray(local: bool, loopback: bool = False):
    """Ray, imported on demand (an optional extra); a local runtime is pinned to 127.0.0.1 before the import, and so
    is a driver joining a cluster at a loopback address (`loopback`)."""
    if local:
        for k, v in LOCAL_ENV.items():
            os.environ.setdefault(k, v)
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if loopback:
            os.environ.update(LOOPBACK_ENV)
    try:
        import ray
    except ImportError:
        raise LorasumError(_NO_RAY, key="executor") from None
    return ray


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS
H2_SETTINGS = 4  # the frame type a gRPC server (a Ray head's GCS) sends first


def _probe(address: str, timeout: float = 3.0) -> None:
    """Refuse within seconds an address where no Ray head answers (ray.init would retry for a minute): nothing
    listens, or what listens does not answer an HTTP/2 connection preface with a SETTINGS frame as gRPC does (a
    plain TCP or HTTP/1 server)."""
    host, _, port = address.rpartition(":")
    fix = f"start one with `ray start --head --port {port}` on that machine, or omit --address to run a local one"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as s:
            s.sendall(H2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = s.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
            if len(head) == 9 and head[3] != H2_SETTINGS:
                s.settimeout(0.5)
                with contextlib.suppress(OSError):
                    head += s.recv(64)  # the rest of its first line, for the message
    except TimeoutError:
        raise LorasumError(f"{address}: not a Ray head (a server listens there but sent nothing within {timeout:g} s "
                           f"of a gRPC handshake); {fix}", key="address") from None
    except OSError as e:
        raise LorasumError(f"{address}: no Ray cluster answers ({e.strerror or e}); {fix}", key="address") from None
    if len(head) < 9 or head[3] != H2_SETTINGS:
        seen = head.decode("ascii", "replace").splitlines()[0] if head.strip() else "it closed the connection"
        raise LorasumError(f"{address}: not a Ray head (it does not answer a gRPC handshake: {seen!r:.40}); {fix}",
                           key="address")


def uses_gpu(device: str | None, gpu_present: bool) -> bool:
    """Whether jobs with this device run on a CUDA GPU (None/auto: the GPU if present, as load_model picks)."""
    if device in (None, "auto"):
        return gpu_present
    return str(device).split(":", 1)[0] == "cuda"


def worker_resources(device: str | None, workers: int, threads: int, gpu_present: bool) -> dict:
    """Ray's options for each of `workers` worker actors: its CPU threads and, when the jobs run on a GPU, an equal
    share of one GPU (1/workers, rounded down to Ray's 0.0001 resolution so that the shares fit in it), so that
    all workers sit on the same GPU, each keeping its model resident. On the CPU: threads only."""
    options: dict = {"num_cpus": threads}
    if uses_gpu(device, gpu_present):
        options["num_gpus"] = math.floor(10_000 / max(1, workers)) / 10_000
    return options


def connect(opts: ExecutorOptions, threads: int, env: dict | None = None):
    """Join the cluster at --address, or start a local runtime with room for --workers × threads; returns (ray,
    whether this call started it)."""
    loopback = opts.address is not None and is_loopback(opts.address)
    ray = import_ray(local=opts.address is None, loopback=loopback)
    if ray.is_initialized():
        return ray, False
    runtime_env = {"env_vars": {k: v for k, v in {**os.environ, **(env or {})}.items() if k.startswith("LORASUM_")}}
    kw = dict(log_to_driver=False, configure_logging=False, runtime_env=runtime_env)
    if opts.address:
        if loopback:
            _refuse_outward(ray, opts.address)
        ray.init(address=opts.address, **({"_node_ip_address": "127.0.0.1"} if loopback else {}), **kw)
    else:
        # "local": always a fresh runtime of this size, never a cluster that `ray start` left running on the machine
        ray.init(address="local", num_cpus=(opts.workers or max(1, (os.cpu_count() or 1) // threads)) * threads,
                 include_dashboard=False, _node_ip_address="127.0.0.1", **kw)
    return ray, True


def _refuse_outward(ray, address: str) -> None:
    """Refuse a loopback address that Ray would resolve to the machine's outward address (Ray imported before
    `import_ray` pinned it), before ray.init connects there and retries for a minute."""
    resolve = getattr(getattr(getattr(ray, "_private", None), "services", None), "resolve_ip_for_localhost", None)
    node_ip = resolve("127.0.0.1") if resolve is not None else "127.0.0.1"
    if not is_loopback(f"{node_ip}:0"):
        raise LorasumError(f"{address}: Ray would connect to {node_ip} instead (it was imported before lorasum "
                           f"pinned it to loopback); set {', '.join(LOOPBACK_ENV)}=0 in the environment",
                           key="address")


def reraise(error: BaseException, what: str) -> NoReturn:
    """Raise the error a Ray task raised as the driver's own: a LorasumError stays one line, prefixed with `what`
    failed (a job, a tuning worker) and its key written once; anything else is raised as itself (a bug, with its
    traceback)."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, LorasumError):
        raise LorasumError(f"{what}: {cause}") from None
    raise cause if isinstance(cause, BaseException) else error
