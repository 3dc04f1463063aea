"""Which Ray vidgen uses: a local one on loopback unless an address is given."""


def test_local_ray_stays_on_loopback(ray_session):
    import ray

    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}


def test_the_same_stop_signal_twice_at_once_is_one_notice_and_a_later_one_stops_at_once():
    """`ray job stop` sends SIGTERM to every process of the job, and the job script forwards its own
    to the vidgen command: that command saw two at once and stopped without its graceful stop."""
    import os
    import signal
    import time

    import pytest

    from vidgen import runtime

    with runtime.stop_on_signal("finishing") as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the same notice, from the job script
        except KeyboardInterrupt:
            pytest.fail("the same SIGTERM twice at once stopped at once")
        assert stop.by == "SIGTERM"
        time.sleep(runtime.REPEAT_S + 0.2)
        with pytest.raises(KeyboardInterrupt, match="SIGTERM again"):
            os.kill(os.getpid(), signal.SIGTERM)  # sent again later: stop at once
            time.sleep(1.0)


def test_a_local_ray_console_shows_worker_lines_but_not_rays_known_notices(tmp_path):
    """`vidgen demo` opened with Ray's "Token authentication is enabled" warning and printed Ray
    Train's PreemptionWatcher notice (an error line from Ray's core worker) once per training run;
    a worker's own lines, errors included, still reach the console."""
    import os
    import subprocess
    import sys

    from vidgen.runtime import HIDDEN_WORKER_LINES

    script = f"""
import io, sys, time
import ray
from vidgen.runtime import init_ray

class Seen(io.TextIOBase):  # what reaches this driver's stderr, where Ray prints forwarded worker errors
    def __init__(self, inner):
        self.inner, self.text = inner, ""
    def write(self, s):
        self.text += s
        return self.inner.write(s)
    def flush(self):
        self.inner.flush()

sys.stderr = seen = Seen(sys.stderr)
init_ray(num_cpus=1)

@ray.remote(num_cpus=0)
def noisy():
    print("E core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' " + {HIDDEN_WORKER_LINES[0]!r},
          file=sys.stderr, flush=True)
    print("a worker's own error line", file=sys.stderr, flush=True)

ray.get(noisy.remote())
deadline = time.monotonic() + 60  # Ray's log monitor forwards worker output within a second or so
while "a worker's own error line" not in seen.text and time.monotonic() < deadline:
    time.sleep(0.2)
time.sleep(0.5)
ray.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "a worker's own error line" in out
    assert "PreemptionWatcher" not in out
    assert "Token authentication" not in out


def test_a_local_ray_keeps_its_preemption_watcher_setting_out_of_this_process(ray_session):
    """The local Ray's processes start with the PreemptionWatcher off, but this process's
    environment is left as it was: Ray Train passes the driver's value on to its controller, and
    the multi-node drain test (a cluster started from this process) lost its just-in-time
    checkpoint to the leaked setting."""
    import os

    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ
    assert "RAY_idle_worker_killing_time_threshold_ms" not in os.environ


def test_a_local_rays_idle_workers_wait_as_long_as_a_renders_kept_model_workers(ray_session):
    """Ray ends an idle worker process 1 s after its task when more processes live than CPUs, and a
    render's kept model worker is one of them: the next batch started an encoder's process again
    (python, ray, vidgen: 0.5-0.9 s of a 2.6 s batch on 2 cores). The local Ray's raylet keeps
    idle workers for render.batch.KEEP_WARM_S."""
    import psutil

    from vidgen.runtime import KEEP_WARM_S

    import ray

    socket = ray._private.worker.global_worker.node.raylet_socket_name  # this Ray's raylet, not a test cluster's
    [raylet] = [p for p in psutil.process_iter(["name", "cmdline"])
                if p.info["name"] == "raylet" and any(socket in arg for arg in p.info["cmdline"])]
    assert raylet.environ().get("RAY_idle_worker_killing_time_threshold_ms") == str(int(KEEP_WARM_S * 1000))

