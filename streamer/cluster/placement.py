"""Where the workers run: a local Ray for `serve --workers N`, or a running cluster
(`--ray-address`), and the named, detached worker actors on it.

Workers are named `xportrait-worker-I` in the Ray namespace `xportrait` and live detached,
so they belong to the cluster, not to the front that made them: a front that restarts finds
them again by name (with their sessions), and a second front on the same cluster shares them.
A diffusion worker takes one GPU (`num_gpus=1`: Ray gives it its own CUDA_VISIBLE_DEVICES);
a warp worker takes `--worker-cpus` CPUs. Ray restarts a worker whose process dies, without
limit (`max_restarts=-1`); calls in flight then fail, they are never retried (a WebRTC offer
must not be answered twice).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from engines.options import XPortraitOptions

from ..options import ClusterOptions, ServeOptions

logger = logging.getLogger("xportrait.cluster")

NAMESPACE = "xportrait"
WORKER_PREFIX = "xportrait-worker-"
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # uploads (10 MiB at most) are the largest objects


class ClusterError(RuntimeError):
    """The cluster cannot run the workers; the message says why and what to do."""


def worker_name(index: int) -> str:
    return f"{WORKER_PREFIX}{index}"


def uses_gpu(options: ServeOptions) -> bool:
    engine = options.engine
    return isinstance(engine, XPortraitOptions) and engine.device != "cpu"


def worker_resources(options: ServeOptions) -> dict:
    """What Ray reserves for one worker: a GPU (and a CPU for its tracking) or CPUs."""
    if uses_gpu(options):
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_cpus": options.cluster.worker_cpus}


def connect(cluster: ClusterOptions) -> str:
    """Start a local Ray (no address) or join one; returns the cluster's address for messages.
    Raises ClusterError."""
    if cluster.address is not None and "RAY_AUTH_MODE" not in os.environ and (
            (Path.home() / ".ray" / "auth_token").exists() or os.environ.get("RAY_AUTH_TOKEN")):
        # As `ray start` does: a token here means the cluster asks for it (Ray's token auth).
        # Ray reads this when it is imported.
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
    except ImportError:
        raise ClusterError("--workers and --ray-address need Ray: pip install 'xportrait[cluster]'") from None
    if cluster.address is None:
        cpus = min(cluster.cpus or os.cpu_count() or 1, os.cpu_count() or 1)
        ray.init(address="local", num_cpus=cpus, namespace=NAMESPACE, include_dashboard=False,  # never a running one
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, logging_level=logging.WARNING,
                 configure_logging=False)
        return "a local Ray (this machine)"
    try:
        ray.init(address=cluster.address, namespace=NAMESPACE, logging_level=logging.WARNING,
                 configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"cannot join the Ray cluster at {cluster.address}: {str(exc).splitlines()[0]} "
                           "(start one with `ray start --head` and give its HOST:6379)") from None
    return f"the Ray cluster at {cluster.address}"


def check_resources(options: ServeOptions, count: int, where: str) -> tuple[int, list[str]]:
    """How many of `count` workers the cluster can place now, and warnings for those that
    will wait; refuses what can never run (ClusterError)."""
    import ray

    total = ray.cluster_resources()
    need = worker_resources(options)
    if uses_gpu(options) and total.get("GPU", 0) < 1:
        raise ClusterError(f"the diffusion engine's workers take one GPU each, and {where} has no GPU: start "
                           "`ray start` on GPU hosts (or give --device cpu)")
    warnings, placeable = [], count
    for key, name in (("num_gpus", "GPU"), ("num_cpus", "CPU")):
        have = total.get(name, 0)
        if key in need and have < need[key] * count:
            placed = int(have // need[key])
            placeable = min(placeable, placed)
            warnings.append(f"{count} workers need {need[key] * count:g} {name}s and {where} has {have:g}: "
                            f"{count - placed} wait until the cluster grows")
    return max(1, placeable), warnings


def running_workers() -> list[str]:
    """The names of the workers alive (or restarting) on the cluster, in order."""
    from ray.util import list_named_actors

    names = [n for n in list_named_actors() if n.startswith(WORKER_PREFIX) and n[len(WORKER_PREFIX):].isdigit()]
    return sorted(names, key=lambda n: int(n[len(WORKER_PREFIX):]))


def start_workers(options: ServeOptions, loopback_media: bool) -> dict:
    """Handles to workers 0..N-1 (made where missing; running ones are taken as they are),
    or to the running ones without --workers. Raises ClusterError."""
    import ray

    from .worker import Worker

    count = options.cluster.workers
    if count is None:
        names = running_workers()
        if not names:
            raise ClusterError("no xportrait workers run on this cluster: give --workers N to start them")
        return {name: ray.get_actor(name, namespace=NAMESPACE) for name in names}
    actor = ray.remote(Worker)
    handles = {}
    for index in range(count):
        name = worker_name(index)
        handles[name] = actor.options(
            name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
            max_restarts=-1, max_task_retries=0, max_concurrency=1000, **worker_resources(options),
        ).remote(name, options, loopback_media)
    return handles


def stop_workers(handles: dict) -> None:
    import ray

    for handle in handles.values():
        ray.kill(handle, no_restart=True)


def disconnect() -> None:
    import ray

    ray.shutdown()
