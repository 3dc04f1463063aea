"""Which Ray to use, decided in one place.

`RAY_ADDRESS` (or an explicit address) when given; otherwise a new local Ray bound to 127.0.0.1
(`ray.init("local")`). A bare `ray.init()` would silently join whatever Ray was last started with
`ray start` on this machine (NOTES-stack.md); vidgen never does that.
"""

from __future__ import annotations

import os


def init_ray(address: str | None = None, num_cpus: int | None = None, object_store_memory: int | None = None) -> None:
    """Connect to the Ray at `address`/`RAY_ADDRESS`, or start a local one; no-op if connected."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    # DeepSpeed on CPU: choose its accelerator up front (silences a warning on every worker).
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if address and address != "local":
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        "local",
        num_cpus=num_cpus,
        object_store_memory=object_store_memory or int(os.environ.get("VIDGEN_OBJECT_STORE_BYTES", 2 * 1024**3)),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
    )
