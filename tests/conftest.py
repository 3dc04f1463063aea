"""Shared fixtures: a real S3 server (moto) on 127.0.0.1, and one storage root per backend.

Every test that takes `root` runs twice: once against a local folder and once against moto's S3
server, with the same test code (the `backend` parameter).
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

# Multipart uploads for objects from 64 KiB (parts of 32 KiB; moto accepts parts from 16 KiB), so
# the tests' small videos and models take the multipart path real large objects take. Set before
# any import of moto or vidgen, and inherited by the session's Ray workers and subprocesses.
os.environ.setdefault("VIDGEN_S3_MULTIPART_BYTES", str(64 * 1024))
os.environ.setdefault("S3_UPLOAD_PART_MIN_SIZE", str(16 * 1024))

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port; the standard AWS variables point at it.

    Yields the endpoint URL. Set in os.environ so subprocesses (the `vidgen` command, Ray workers)
    see the same endpoint and credentials, exactly as a user's shell would.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV)
    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    os.environ.pop("AWS_ENDPOINT_URL", None)
    from vidgen import storage

    storage.reset_clients()
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage.reset_clients()
        server.stop()


@pytest.fixture(scope="session")
def s3_bucket(s3_server):
    """One bucket for the session; tests use unique prefixes inside it."""
    from vidgen import storage

    storage.s3_client().create_bucket(Bucket="vidgen-test")
    return "vidgen-test"


@pytest.fixture(params=["local", "s3"])
def backend(request):
    return request.param


@pytest.fixture
def root(backend, tmp_path, request):
    """A fresh, empty storage root URI on the parametrised backend."""
    if backend == "local":
        return str(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3_root(s3_bucket):
    """A fresh prefix on moto's S3, for tests that are about S3 only."""
    return f"s3://{s3_bucket}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole session (bound to 127.0.0.1; sees moto's endpoint via env)."""
    import ray

    from vidgen.runtime import init_ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    init_ray(num_cpus=2, object_store_memory=1024**3)
    yield
    ray.shutdown()


@pytest.fixture
def ray_address(ray_session) -> str:
    """The session Ray's address, for a `vidgen` command run as a driver of its own. This process's
    kept render workers are ended first: their cores would be missing from that driver's (on 2
    CPUs, a SIGTERM test's encodes waited in Ray's queue, and Ray's driver once aborted on a
    cancelled one, "Tried to complete task that was not pending")."""
    import ray

    from vidgen.runtime import release_warm_workers

    release_warm_workers()
    return ray.get_runtime_context().gcs_address


class MultiNode:
    """A Ray cluster of several nodes on this machine (`ray.cluster_utils.Cluster`, what Ray's own
    multi-node tests use), every node on 127.0.0.1: a head with no CPU (it runs Ray's own processes
    only, as on a KubeRay head with num-cpus 0, so vidgen's work can always lose its node), a "cpu"
    node with 2 CPUs and a "gpu" node with 2 CPUs and one logical GPU. Tests drive it through `vidgen` processes
    given its address (this process stays on the session's own Ray); `replace` is a node's
    SIGKILL followed by the node an autoscaler would add in its place."""

    SHAPES = {"cpu": {"num_cpus": 2}, "gpu": {"num_cpus": 2, "num_gpus": 1}}

    def __init__(self):
        from ray.cluster_utils import Cluster

        # Ray Train looks for draining nodes every 5 s by default; the nodes' processes inherit this
        os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")

        self.cluster = Cluster(initialize_head=True, connect=False,
                               head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1"})
        self.nodes = {name: self._add(name) for name in self.SHAPES}
        assert self.cluster.address.startswith("127.0.0.1:"), self.cluster.address

    def _add(self, name: str):
        node = self.cluster.add_node(node_ip_address="127.0.0.1", **self.SHAPES[name])
        assert node.node_ip_address == "127.0.0.1"
        return node

    @property
    def env(self) -> dict[str, str]:
        """The environment of a `vidgen` process that joins this cluster."""
        return {**os.environ, "RAY_ADDRESS": self.cluster.address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}

    def replace(self, name: str, after_s: float = 2.0):
        """Kill the node (no graceful shutdown) and, after_s later, add a new one of its shape."""
        import time

        self.cluster.remove_node(self.nodes[name], allow_graceful=False)
        time.sleep(after_s)
        self.nodes[name] = self._add(name)
        return self.nodes[name]


@pytest.fixture(scope="module")
def multinode(s3_server):
    """One multi-node cluster for a test module, shut down after it: its idle daemons (a second GCS,
    three raylets, dashboard agents) would otherwise slow every later test on 2 cores."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node and driver on 127.0.0.1 (NOTES-stack.md)
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    cluster = MultiNode()
    yield cluster
    cluster.cluster.shutdown()
