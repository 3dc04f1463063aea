"""The Serve application (`build_app`, and `app_builder` for serve/config.yaml's import_path) and
`vidgen serve`, which starts it here."""

import contextlib
import hashlib
import os
import signal
import time
from typing import Any

import yaml
from ray import serve

from vidgen import storage
from vidgen.errors import InputError
from vidgen.serving.ingress import TOKEN_ENV, Ingress, _is_loopback
from vidgen.serving.model_server import ModelServer
from vidgen.serving.runner import JobRunner
from vidgen.serving.settings import RUNNER_MAX_ONGOING, Autoscaling, ServiceSettings, load_settings

APP_NAME = "vidgen"


def _autoscaling(a: Autoscaling) -> dict:
    return a.model_dump(exclude_none=True)


def build_app(settings: ServiceSettings, token: str | None = None):
    """The Serve application for `settings`. `token`: the API token (default: $VIDGEN_API_TOKEN);
    only its sha256 reaches the replicas."""
    from vidgen.runtime import release_warm_workers

    release_warm_workers()  # a render's model workers kept warm by this process: the replicas want the cores
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    handles = {}
    for name in settings.models:
        d = settings.deployment_of(name)
        handles[name] = serve.deployment(ModelServer).options(
            name=f"model-{name}",
            ray_actor_options={"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
            max_ongoing_requests=max(d.max_ongoing_requests, d.max_batch_size),
            autoscaling_config=_autoscaling(d.autoscaling),
            health_check_period_s=5,
        ).bind(name, settings.model_uri(name), d)
    r = settings.runner
    runner = serve.deployment(JobRunner).options(
        name="runner", num_replicas=r.num_replicas, ray_actor_options={"num_cpus": r.num_cpus},
        max_replicas_per_node=r.max_replicas_per_node, max_ongoing_requests=RUNNER_MAX_ONGOING,
        health_check_period_s=5,
    ).bind(settings, handles)
    i = settings.ingress
    return serve.deployment(Ingress).options(
        name="ingress", ray_actor_options={"num_cpus": i.num_cpus},
        max_ongoing_requests=i.max_ongoing_requests, max_queued_requests=i.max_queued_requests,
        autoscaling_config=_autoscaling(i.autoscaling),
    ).bind(settings, hashlib.sha256(token.encode()).hexdigest() if token else None, runner)


def app_builder(args: dict[str, Any]):
    """`import_path: vidgen.serving:app_builder` in serve/config.yaml; `args` are ServiceSettings."""
    return build_app(load_settings(args))


# --------------------------------------------------------------------------------------------
# `vidgen serve`: the same application, started here


def read_config(path: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(builder args, http_options) of our application in a Serve config file (serve/config.yaml)."""
    if path is None:
        return {}, {}
    try:
        text = storage.read_text(path)
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    apps = [a for a in config.get("applications") or [] if str(a.get("import_path", "")).startswith("vidgen.serving:")]
    if not apps:
        raise InputError(f"{path}: no application with import_path vidgen.serving:app_builder")
    return dict(apps[0].get("args") or {}), dict(config.get("http_options") or {})


def serve_forever(settings: ServiceSettings, host: str, port: int, address: str | None = None) -> None:
    """Start (or join) Ray, run the application on host:port until Ctrl-C or SIGTERM."""
    import ray

    from vidgen.runtime import init_ray

    if not os.environ.get(TOKEN_ENV) and not _is_loopback(host):
        raise InputError(f"refusing to serve on {host} without a token: set {TOKEN_ENV} (or use --host 127.0.0.1)")
    def stop(signum, frame):  # a service manager's SIGTERM: shut down like Ctrl-C
        raise KeyboardInterrupt

    init_ray(address)
    signal.signal(signal.SIGTERM, stop)  # after ray.init, which installs its own (fatal) handler
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
        models = ", ".join(f"{n}={settings.model_uri(n)}" for n in settings.models) or "none"
        print(f"vidgen serve: http://{host}:{port}  (docs /docs, health /healthz; models: {models}; "
              f"outputs under {settings.output_root}; auth: {'bearer token' if os.environ.get(TOKEN_ENV) else 'off'})",
              flush=True)
        while True:
            time.sleep(3600)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        if not address and not os.environ.get("RAY_ADDRESS"):
            ray.shutdown()
