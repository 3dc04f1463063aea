"""What the benchmarks share: moto's S3 server on loopback, and the machine's name for the results.

The benchmarks run with the project's environment (`pip install -e .`), so `vidgen` imports as
installed; a script here imports this module as `harness` (its folder is on sys.path).
"""

from __future__ import annotations

import os
import platform
import socket
import sys
import time

from vidgen import storage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3(own_process: bool = False) -> str:
    """moto's S3 server on a free loopback port, wired through the standard AWS variables; the
    bucket s3://bench. `own_process`: run it as its own process (so it does not share this
    process's GIL with a load generator) rather than in a thread of this one."""
    import logging

    port = free_port()
    if own_process:
        import atexit
        import subprocess

        server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                                   "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        atexit.register(server.terminate)
    else:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's access log
        ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"})
    storage.reset_clients()
    deadline = time.monotonic() + 30
    while True:
        try:
            storage.s3_client().create_bucket(Bucket="bench")
            return "s3://bench"
        except Exception:  # noqa: BLE001 - not listening yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return name


def machine() -> str:
    """The CPU, its cores, and whether a GPU is there: each result keeps the machine it ran on."""
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    return f"{cpu_name()}, {os.cpu_count()} cores, {'GPU' if gpu else 'no GPU'}"
