"""The model deployment: one model per replica, items batched across requests and jobs."""

import asyncio
import logging
import time
from dataclasses import dataclass

from ray import serve

from vidgen.render.spec import ResolvedItem
from vidgen.serving.settings import ModelDeployment

logger = logging.getLogger("ray.serve")  # Serve adds the request id to each line logged in a request


@dataclass(frozen=True)
class Served:
    """Where an encode task reads a streamed item's messages: a model deployment's `stream`."""

    handle: object  # the model's DeploymentHandle
    digest: str  # the weights its job was planned with

    def open(self, item: ResolvedItem):
        return self.handle.options(stream=True).stream.remote(item, self.digest)


class ModelServer:
    """One model, loaded once per replica; `infer` is batched across requests (and jobs).

    A request is one item; the answer is {"meta": ..., "chunks": {stream: [ObjectRef, ...]}} (the
    frames stay in the object store for the encoder) or {"error": message} (the item's error).
    """

    def __init__(self, name: str, uri: str, settings: ModelDeployment):
        self.name, self.uri = name, uri
        self.use_gpu = settings.num_gpus > 0
        self.infer.set_max_batch_size(settings.max_batch_size)
        self.infer.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.model, self.sha256 = None, None
        self.stats = {"batches": 0, "items": 0, "busy_s": 0.0, "max_batch": 0}
        try:
            self._load()
        except Exception as e:  # noqa: BLE001 - the app starts without the model; requests say why
            logger.warning(f"model {name} ({uri}) is not available yet: {e}")

    def _load(self):
        import torch

        from vidgen import models
        from vidgen.render.engine import ModelInfo

        device = "cuda" if self.use_gpu and torch.cuda.is_available() else "cpu"
        self.model = models.load(self.uri, device)
        self.sha256 = ModelInfo.from_manifest(self.uri, self.model.manifest).sha256
        logger.info(f"model {self.name} loaded from {self.uri} on {device} (weights {self.sha256[:12]})")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def infer(self, requests: list[tuple[ResolvedItem, str]]) -> list[dict]:
        """Each request: (item, the weights digest its job planned with)."""
        return await asyncio.get_running_loop().run_in_executor(None, self._infer, requests)

    async def stream(self, item: ResolvedItem, digest: str):
        """A streamed item (restore, stylize), read by its encode task through a streaming handle
        while the model makes it: the messages of `batch.stream_events`, or ("unavailable", why)
        when the model cannot be loaded with the weights the job planned with."""
        loop, done = asyncio.get_running_loop(), object()
        messages = self._stream(item, digest)
        while (message := await loop.run_in_executor(None, next, messages, done)) is not done:
            yield message

    def _stream(self, item: ResolvedItem, digest: str):
        from vidgen.render import engine
        from vidgen.render.batch import stream_events

        problem = self._ready({digest})
        if problem is None and digest != self.sha256:
            problem = self._changed()
        if problem is not None:
            yield "unavailable", problem
            return
        self.stats["streams"] = self.stats.get("streams", 0) + 1
        yield from stream_events(self.model, item, engine.CHUNK_FRAMES)

    def _ready(self, digests: set[str]) -> str | None:
        """Load the model if it is not yet, reload it if re-exported with weights asked for; the
        reason it cannot be used, or None."""
        if self.model is None:
            try:
                self._load()
            except Exception as e:  # noqa: BLE001 - every item asking for it records it
                return f"model {self.name} ({self.uri}) cannot be loaded: {e}"
        elif any(digest != self.sha256 for digest in digests):
            self._reload_if_reexported(digests)
        return None

    def _changed(self) -> str:
        return (f"model {self.name} ({self.uri}) changed after this job was planned: it holds weights "
                f"{self.sha256[:12]} now; submit the job again")

    def _infer(self, requests: list[tuple[ResolvedItem, str]]) -> list[dict]:
        from vidgen.render import engine
        from vidgen.render.batch import infer_into_object_store

        started = time.monotonic()
        problem = self._ready({digest for _, digest in requests})
        if problem is not None:
            return [{"error": problem, "model_trouble": True}] * len(requests)
        stale = {i for i, (_, digest) in enumerate(requests) if digest != self.sha256}
        items = [item for i, (item, _) in enumerate(requests) if i not in stale]
        if stale:
            logger.warning(f"model {self.name}: {len(stale)} item(s) planned with other weights than {self.uri} "
                           f"holds now ({self.sha256[:12]}): not rendered")
        answers = iter(infer_into_object_store(self.model, items, engine.CHUNK_FRAMES))
        self.stats["batches"] += 1
        self.stats["items"] += len(items)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(items))
        self.stats["busy_s"] += time.monotonic() - started
        changed = {"error": self._changed(), "model_trouble": True}
        return [changed if i in stale else next(answers) for i in range(len(requests))]

    def _reload_if_reexported(self, wanted: set[str]) -> None:
        """Reload when model.json names other weights than the ones held, and a request asks for
        them (a re-export to the same URI); a job planned before the re-export is not rendered with
        weights its records would not name. A failed reload keeps the model it holds."""
        from vidgen import models
        from vidgen.render.engine import ModelInfo

        try:
            current = ModelInfo.from_manifest(self.uri, models.read_manifest(self.uri)).sha256
            if current != self.sha256 and current in wanted:
                self._load()
        except Exception as e:  # noqa: BLE001 - a re-export in progress: the requests that need it fail
            logger.warning(f"model {self.name}: reloading {self.uri} failed, keeping weights {self.sha256[:12]}: {e}")

    def get_stats(self) -> dict:
        return dict(self.stats, replica=serve.get_replica_context().replica_tag, sha256=self.sha256)
