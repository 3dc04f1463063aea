"""Which Ray to use, decided in one place.

`RAY_ADDRESS` (or an explicit address) when given; otherwise a new local Ray bound to 127.0.0.1
(`ray.init("local")`). A bare `ray.init()` would silently join whatever Ray was last started with
`ray start` on this machine (NOTES-stack.md); vidgen never does that.

The driver's console: worker output is forwarded (`log_to_driver`, so rank 0's training lines and
worker tracebacks show), Ray's own driver-side lines only from WARNING up.
"""

from __future__ import annotations

import contextlib
import logging
import os
from importlib import resources

from vidgen.errors import InputError


KEEP_WARM_ENV = "VIDGEN_RENDER_KEEP_WARM_S"  # a finished render's model worker waits this long (default 60 s;
KEEP_WARM_S = 60.0                            # 0: ended at once) for this process's next batch of its weights
_WARM_RELEASES: list = []


def env_seconds(name: str, default: float) -> float:
    """Seconds >= 0 from the variable `name` (default when unset); InputError naming a wrong value."""
    value = os.environ.get(name, "")
    try:
        seconds = float(value) if value else default
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise InputError(f"{name}={value!r}: expected seconds >= 0")
    return seconds


def keep_warm_s() -> float:
    """Seconds a render keeps a finished batch's model worker (KEEP_WARM_ENV)."""
    return env_seconds(KEEP_WARM_ENV, KEEP_WARM_S)


def release_warm_workers_on(release) -> None:
    """Have `release()` called by release_warm_workers: it ends workers a stage keeps warm
    between its calls in this process (a render's model workers)."""
    _WARM_RELEASES.append(release)


def release_warm_workers() -> None:
    """End every worker kept warm in this process, before a stage that would otherwise wait for the
    cores (or GPUs) they hold: every init_ray but a render's, and an endpoint's build_app."""
    for release in _WARM_RELEASES:
        release()


def _loopback_only() -> None:
    """Make a local Ray use 127.0.0.1 as its node address, for itself and its worker processes.

    Ray turns `_node_ip_address="127.0.0.1"` into the machine's outward address unless it runs as
    a single-node Ray (its `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` mode). A local vidgen Ray is one
    node, and its traffic should never leave loopback. The variable is read when ray is imported,
    so the already-imported constant is set too.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def init_ray(address: str | None = None, num_cpus: int | None = None, object_store_memory: int | None = None,
             keep_warm: bool = False) -> None:
    """Connect to the Ray at `address`/`RAY_ADDRESS`, or start a local one; no-op if connected.
    Every stage but a render (`keep_warm`) first ends the workers kept warm by this process's
    renders (release_warm_workers): ingest, training, an endpoint size themselves by the cores."""
    import ray

    if not keep_warm:
        release_warm_workers()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    # DeepSpeed on CPU: choose its accelerator up front (silences a warning on every worker).
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # The "ray" logger of this process: no "Started a local Ray instance" or dashboard URL lines.
    quiet = {"log_to_driver": True, "logging_level": logging.WARNING}
    if address and address != "local":
        ray.init(address=address, **quiet)
        _hide_worker_lines()
        return
    _loopback_only()
    # Ray starts a new local Ray with token authentication (its default since 2.5x) and says so in a
    # warning at the top of every command's output; the choice stands, the notice goes.
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_token_auth_notice)
    # Every process of this Ray inherits the variable: Ray Data's INFO lines go to its log file only.
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(resources.files("vidgen") / "assets" / "ray-data-logging.yaml"))
    # A local Ray is one node: none of it can be drained while the rest trains on, so Ray Train's
    # PreemptionWatcher (an actor of its own, a Python process: 2.5 CPU-seconds of every run's start on
    # 2 cores) has nothing to watch. On a cluster (an address) it stays on: see train/loop.py. Only
    # the local Ray's processes get the setting (they start inside ray.init and keep its environment),
    # not this process: Ray Train passes the driver's value on to its controller, so it would reach a
    # cluster this process, or a process started from it, joins later.
    # Ray ends an idle worker process after 1 s when more processes live than the node has CPUs; a
    # render's model worker is one of them, so one of its encoders' processes went between two batches
    # and the next batch started a new one (python, ray, vidgen's imports: 0.5-0.9 s of a 2.6 s batch
    # on 2 cores, bench/render.py). A local Ray keeps idle workers as long as a render keeps its model
    # workers warm (KEEP_WARM_ENV, render/batch.py); a cluster's raylets keep their operator's setting.
    try:
        keep = keep_warm_s()
    except InputError:  # said by the render that reads it; this Ray keeps the default
        keep = KEEP_WARM_S
    idle_ms = str(int(max(1.0, keep) * 1000))  # Ray's default: 1 s
    with _environ(RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0", RAY_idle_worker_killing_time_threshold_ms=idle_ms):
        _start_local_ray(num_cpus, object_store_memory, quiet)
    _hide_worker_lines()


@contextlib.contextmanager
def _environ(**defaults: str):
    """Set each variable not already set for the duration of the block, then remove it again."""
    added = {k: v for k, v in defaults.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _start_local_ray(num_cpus: int | None, object_store_memory: int | None, quiet: dict) -> None:
    import ray

    ray.init(
        "local",
        num_cpus=num_cpus,
        object_store_memory=object_store_memory or int(os.environ.get("VIDGEN_OBJECT_STORE_BYTES", 2 * 1024**3)),
        # Ray's default: the dashboard process serves the State API when its packages are installed
        # (ray[default], which ray[serve] brings). Ray Train's PlacementGroupCleaner asks that API
        # every second whether the run's controller is alive; with include_dashboard=False it is
        # not served, and the cleaner logs "Failed to query Ray Train Controller actor state" on
        # each try for the whole run (and cannot free a crashed run's placement group).
        include_dashboard=None,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        **quiet,
    )


def _token_auth_notice(record: logging.LogRecord) -> bool:
    """False for Ray's "Token authentication is enabled for this Ray cluster" notice (a logging filter)."""
    return not str(record.msg).startswith("Token authentication is enabled")


# Worker output that Ray forwards to the driver's console and that says nothing a vidgen user can act
# on; it stays in the workers' log files (/tmp/ray/session_latest/logs, or the demo's logs/ folder).
HIDDEN_WORKER_LINES = (
    # Ray Train's controller starts a PreemptionWatcher actor (restartable, handles in its arguments)
    # and Ray's core worker notes, as an error, that such an actor may fail to restart (ray#53727):
    # once in every training run on a cluster (a local Ray starts none, see init_ray)
    "has constructor arguments in the object store and max_restarts > 0",
)


def _hide_worker_lines() -> None:
    """Drop HIDDEN_WORKER_LINES from the worker output printed on this driver's console.

    Ray prints forwarded worker output through a handler named "ray_print_logs" on its
    stdstream dispatcher; it is wrapped here. Where Ray has no such handler (another version, or
    log_to_driver off), nothing changes and the lines show.
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        handlers = [h for name, h in dispatcher.handlers if name == "ray_print_logs"]
    except (ImportError, AttributeError):
        return
    if len(handlers) != 1 or getattr(handlers[0], "hides_lines", False):
        return
    forward = handlers[0]

    def filtered(data: dict) -> None:
        lines = [line for line in data.get("lines", []) if not any(h in line for h in HIDDEN_WORKER_LINES)]
        if lines:
            forward({**data, "lines": lines})

    filtered.hides_lines = True
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", filtered)


class RayDataConsoleFilter(logging.Filter):
    """The console filter of Ray Data's logging in a local vidgen Ray (assets/ray-data-logging.yaml):
    Ray's own (a record marked `hide` stays in the log file), and also the notices that only say a
    setting vidgen chose is in effect ("Progress bars disabled. To enable, ..."), which every
    process that runs a dataset printed once."""

    NOTICES = ("Progress bars disabled", "Progress bars for operators disabled")

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "hide", False) and not str(record.msg).startswith(self.NOTICES)


class StopRequest:
    """What `stop_on_signal` learnt: `by` is the first signal's name ("SIGTERM", "SIGINT") or None."""

    def __init__(self):
        self.by: str | None = None
        self.at: float | None = None  # time.monotonic() of the first signal

    def __bool__(self) -> bool:
        return self.by is not None



def signal_exit_code(name: str) -> int:
    """128 + the signal's number, as a shell reports a process the signal ended: the exit code of a
    command that stopped early on a signal, so a job runner (a RayJob, a Kubernetes Job) runs it
    again, and the rerun resumes."""
    import signal

    return 128 + signal.Signals[name].value


REPEAT_S = 1.0  # the same signal again within this long is the same notice, delivered twice


@contextlib.contextmanager
def stop_on_signal(what: str, on_stop=None):
    """While inside: the first SIGTERM (a spot node's notice, a stopped job) or Ctrl-C asks for a
    graceful stop (the yielded StopRequest becomes true, then `on_stop()` runs); a second one stops
    at once (KeyboardInterrupt), unless it is the same signal within REPEAT_S of the first. Outside
    the main thread, where Python keeps no handlers, nothing is installed. Install after ray.init,
    which sets its own handler."""
    import signal
    import threading
    import time

    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, _frame):
        name = signal.Signals(signum).name
        if stop and name == stop.by and time.monotonic() - stop.at < REPEAT_S:
            return  # the same notice twice: `ray job stop` signals each process of a job; the job script forwards it
        if stop:
            raise KeyboardInterrupt(f"{name} again: stopping at once")
        stop.by, stop.at = name, time.monotonic()
        print(f"[vidgen] {name}: {what} (send it again to stop at once)", flush=True)
        if on_stop is not None:
            on_stop()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
