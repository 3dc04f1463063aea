"""Rendering endpoints on Ray Serve: an HTTP API that renders batches of videos into object storage.

    vidgen serve --model g=s3://bucket/models/g --output-root s3://bucket/renders   # on 127.0.0.1:8000
    serve run serve/config.yaml                                                  # Ray's own CLI, the same app
    VIDGEN_API_TOKEN=... vidgen serve serve/config.yaml --host 0.0.0.0 --port 8000

    curl -H "Authorization: Bearer $VIDGEN_API_TOKEN" -H 'Content-Type: application/json' \\
         -d '{"name": "spring", "model": "g", "items": [{"id": "ad-01", "mode": "generate", "seed": 7}]}' \\
         http://127.0.0.1:8000/v1/renders                        # 202 {"id": ..., "status_url": ...}

One Serve application; every replica asks for a fraction of a CPU (the whole app fits 2 cores):

    HTTP ─► Ingress (FastAPI)        validates a request against the render spec and the service's
                                     limits, writes the job record and a queue marker, pokes a runner;
                                     answers status from object storage (any replica, at any time;
                                     `?wait_s=` waits for the job's end, which its runner reports)
            JobRunner                claims queued jobs with a lease in storage (compare-and-swap,
                                     heartbeat), plans them with the render engine (records already
                                     there are kept), sends each item to its model, hands the frames to
                                     an encode task; takes over jobs whose runner died (stale heartbeat)
            ModelServer (per model)  one model load per replica (a GPU when the config asks);
                                     @serve.batch groups compatible items across jobs; frames go to the
                                     object store; autoscaled on ongoing requests
            encode tasks (Ray, CPU)  frames -> ffmpeg -> upload -> the item's record (engine.encode_item)

Job state lives in object storage under the output root ROOT, so any ingress replica answers for
any job and a restarted replica loses nothing:

    ROOT/<job>/...                   the render's outputs: <item>.mp4, <item>.jpg, items/<item>.json,
                                     then manifest.jsonl and index.html
    ROOT/_jobs/<job>.json            the job record: the validated batch, created, request id (written once)
    ROOT/_jobs/<job>/lease.json      the runner's lease: runner, heartbeat, state, attempt (compare-and-swap)
    ROOT/_jobs/<job>/cancel.json     DELETE's mark
    ROOT/_queue/<job>.json           the job is unfinished (written before the job record); its runner
                                     removes it at the end
    ROOT/_idempotency/<sha256>.json  an Idempotency-Key (hashed) -> the job it created

A job's status: `queued` (no runner yet), `running`, `done` (every item ok), `failed` (every item
finished and some failed, or the job itself could not run), `cancelled`.

The code, one file per concern (each imports only the ones above it):

    settings.py      ServiceSettings and its parts (the builder's args), input_limits, readable
    store.py         the typed records (Job, Lease), conditional writes (put_json, read_json_etag), JobStore,
                     job_status, storage threads
    ingress.py       the request and response models, _Guard (auth, body bound), the Ingress deployment
    model_server.py  ModelServer (the model deployment), Served (a streamed item's source)
    runner.py        JobRunner (the job runner deployment)
    app.py           build_app, app_builder (serve/config.yaml's import_path), read_config, serve_forever
"""

from vidgen.serving.app import APP_NAME, app_builder, build_app, read_config, serve_forever
from vidgen.serving.ingress import TOKEN_ENV, Ingress, RenderRequest
from vidgen.serving.model_server import ModelServer
from vidgen.serving.runner import JobRunner
from vidgen.serving.settings import ModelDeployment, ServiceSettings, load_settings
from vidgen.serving.store import TERMINAL, Job, JobStore

__all__ = ["APP_NAME", "TERMINAL", "TOKEN_ENV", "Ingress", "Job", "JobRunner", "JobStore", "ModelDeployment",
           "ModelServer", "RenderRequest", "ServiceSettings", "app_builder", "build_app", "load_settings",
           "read_config", "serve_forever"]
