"""The Ray instance a command runs on, and the engine actors' pool (`generate`, `evaluate`; `train` starts
Ray the same way).

Without an address a command joins a cluster that `ray start` left running on this machine, or else starts a
private local instance; only on its own instance does it know every resource there will ever be, so only
there are actors it can never hold refused at once (`check_fits`) instead of waited for.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys
import threading
import warnings
from typing import Any

import ray
from ray.data import ActorPoolStrategy

from pipeline.config import ConfigError, EvaluateConfig, GenerateConfig
from pipeline.engines import VLLM_MISSING
from pipeline.models import check_model_here

log = logging.getLogger(__name__)


def start_ray(address: str | None, verbose: bool = False) -> None:
    """Join `address` (or RAY_ADDRESS, or a cluster `ray start` left on this machine) or start a local
    instance, once per process; and set what Ray, Ray Data and vLLM log: the command's lines, or more (-v)."""
    # Ray Data's progress report is one log block every few seconds when stderr is not a terminal.
    ray.data.DataContext.get_current().enable_progress_bars = verbose
    # And each dataset's "Starting execution ..." and its plan, which train's data actors print on every node.
    ray.data.DataContext.get_current().print_on_execution_start = verbose
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)
    # Its warning that they are off tells a user to set a Python attribute: here that is what -v does.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO if verbose else logging.ERROR)
    # Each run warned of `ray_remote_args`, which nothing here can avoid yet (see pyproject.toml's ray cap).
    warnings.filterwarnings("ignore", message=r".*`ray_remote_args` is deprecated")
    if not verbose:  # vLLM logs at INFO inside the engine actors; `actor_pool` hands them this level
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if not ray.is_initialized():
        _init(address)
    # A stage that runs again replaces its folders: Ray Data warned of each ("[SaveMode=SaveMode.OVERWRITE]
    # Replacing contents ...", five lines in a rerun), of what the stage means to do.
    _quiet("ray.data.datasource.file_datasink", _REPLACING, not verbose)
    # Ray Data looks once, as a dataset starts, for a free CPU, and warns "The Dataset job will hang" if there
    # is none at that instant. On this command's own instance `check_fits` keeps one for Ray Data's tasks, so
    # that is only the last stage's tasks giving theirs back (it came in most 2-core runs); on a cluster it
    # may be true.
    _quiet("ray.data.dataset", _NO_CPUS, _own_instance and not verbose)


def _init(address: str | None) -> None:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # A private local instance: token auth (on by default since Ray 2.60) has nothing to protect here.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # ray.init puts its own SIGTERM handler in (exit code 15, after a C++ stack dump); one the caller set (the
    # command line's: stop as on Ctrl-C) is put back.
    before = signal.getsignal(signal.SIGTERM)
    ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    if callable(before) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, before)
    # Without an address Ray joins a cluster started on this machine by `ray start` (which may autoscale), or
    # else starts its own instance; only the latter makes this process the head node.
    global _own_instance
    _own_instance = bool(getattr(getattr(ray._private.worker, "_global_node", None), "head", False))
    # Said each run: without an address a cluster left running on this machine is joined silently.
    have = ray.cluster_resources()
    resources = f"{have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs"
    log.info("ray: %s", f"started a local instance ({resources})" if _own_instance else
             f"joined the cluster at {ray.get_runtime_context().gcs_address} ({len(ray.nodes())} node(s), "
             f"{resources} now)")


class _Without(logging.Filter):
    """Drops the log records whose message contains `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


_REPLACING = _Without("Replacing contents")
_NO_CPUS = _Without("does not have any available CPUs")


def _quiet(logger: str, without: _Without, on: bool) -> None:
    (logging.getLogger(logger).addFilter if on else logging.getLogger(logger).removeFilter)(without)


_own_instance = False  # start_ray started Ray itself: this machine's resources, and no autoscaler to add more


def check_fits(bundle: dict[str, float], count: int, what: str, keys: str) -> None:
    """Refuse at once `count` actors of `bundle` (resource -> amount) that this process's own local Ray
    instance can never hold beside one CPU for Ray Data's tasks (reading, writing, shuffling feed the actors
    and the training workers): Ray would wait forever for room that no autoscaler adds (a GPU on a machine
    without one; on 2 cores, two 1-CPU engine actors or four 0.5-CPU training workers). On a cluster nodes
    may join; Ray's autoscaler says what it waits for."""
    if not _own_instance:
        return
    nodes = [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]
    need = {k: v for k, v in bundle.items() if v}
    have = {k: sum(node.get(k, 0) for node in nodes) for k in need}
    if nodes:
        max(nodes, key=lambda node: node.get("CPU", 0))["CPU"] -= 1  # Ray Data's tasks ask for 1 CPU each
    if placements(bundle, nodes) < count:
        raise ConfigError(f"{keys}: {what} ({count} x {need}) and one CPU for Ray Data's tasks do not fit this "
                          f"machine's Ray instance ({have} in all): Ray would wait for room forever (for a "
                          f"cluster, set compute.ray_address or RAY_ADDRESS)")


def placements(bundle: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many copies of `bundle` the nodes (resource -> total) hold at once, each on one node."""
    need = {k: v for k, v in bundle.items() if v > 0}
    if not need:
        return sys.maxsize
    return sum(min(int(max(node.get(k, 0), 0) / v + 1e-9) for k, v in need.items()) for node in nodes)


def own_instance() -> bool:
    """Whether `start_ray` started this command's own local instance: this machine is its only node."""
    return _own_instance


def check_engine_actors(cfg: GenerateConfig | EvaluateConfig) -> None:
    """Before any work: refuse engine actors that would never start (their model missing or broken where the
    driver can tell, `check_model_here`; vLLM not installed, `check_installed`) or never fit (`check_fits`)."""
    check_model_here(cfg.model.path, only_node=_own_instance)
    check_fits(engine_actor(cfg), cfg.compute.min_actors, "engine actors",
               "compute.min_actors / num_gpus_per_actor / num_cpus_per_actor")
    if cfg.model.engine == "vllm":
        check_installed("vllm", VLLM_MISSING)


def check_installed(module: str, error: str) -> None:
    """Refuse at once, on this command's own instance, work whose actors or workers import `module` (they start
    on this machine, from this Python) where it is not installed: they would fail one by one, after the work
    before them. On a cluster other nodes may have it; they say `error` where they start."""
    if _own_instance and importlib.util.find_spec(module) is None:
        raise ConfigError(error)


def engine_actor(cfg: GenerateConfig | EvaluateConfig) -> dict[str, float]:
    """The resources one engine actor asks Ray for."""
    return {"CPU": cfg.compute.num_cpus_per_actor, "GPU": cfg.compute.num_gpus_per_actor}


def actor_pool(cfg: GenerateConfig | EvaluateConfig) -> dict[str, Any]:
    """map_batches arguments for the engine actors (generate and evaluate): their resources, an autoscaling
    pool; with vLLM, several batches per actor at once (threads calling into the actor's one engine loop; Ray Data
    otherwise runs a sync UDF one call at a time); and a bounded number of restarts of an actor whose
    engine died (the actor exits, see `restart_actor_if_engine_dead`)."""
    c = cfg.compute
    concurrent = c.concurrent_batches if cfg.model.engine == "vllm" else 1
    resources = engine_actor(cfg)
    args = {"compute": ActorPoolStrategy(min_size=c.min_actors, max_size=c.max_actors,
                                         enable_true_multi_threading=concurrent > 1),
            "num_cpus": resources["CPU"], "num_gpus": resources["GPU"],
            "max_concurrency": concurrent, "max_restarts": c.max_actor_restarts}
    # By default Ray SIGKILLs a retiring worker's child processes before the actor's shutdown hook runs:
    # vLLM's engine core died unstopped, and Python's resource tracker with it (its KeyError tracebacks at
    # every CPU stage's end). The engine actors' __del__ stops them instead (see close_owned_engine); an
    # actor killed outright (ray.kill, a crash) still takes its children with it (tests/test_engines.py).
    env = {"RAY_kill_child_processes_on_worker_exit": "false"}
    # The driver's vLLM log level (see start_ray) reaches the actors on every node of a cluster too
    # (a task's runtime_env is merged with the job's); vLLM's stats line is an INFO line.
    level = "INFO" if cfg.model.log_engine_stats else os.environ.get("VLLM_LOGGING_LEVEL")
    if level:
        env["VLLM_LOGGING_LEVEL"] = level
    args["runtime_env"] = {"env_vars": env}
    return args
