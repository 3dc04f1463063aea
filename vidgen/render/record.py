"""An item's record, OUT/items/<id>.json: what was rendered, from what, and where it went.

One typed home for its fields and their defaults. The render stages build it (`RenderRecord.ok`,
`RenderRecord.failed`), the batch driver, the endpoint, the gallery and the demo read it; the JSON
stored is `to_json()`. A record still reads like that JSON (`record["status"]`), for code and tests
written against the stored form.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from vidgen import __version__
from vidgen.render.spec import COMPARE


class _Readable(BaseModel):
    # extra="allow": a record written by a newer vidgen keeps the fields this one does not know
    model_config = ConfigDict(frozen=True, extra="allow", protected_namespaces=())

    def __getitem__(self, key: str) -> Any:
        """Read a field by its JSON name, as from the stored record."""
        if key not in type(self).model_fields and key not in (self.model_extra or {}):
            raise KeyError(key)
        return getattr(self, key)


class OutputFacts(_Readable):
    """Where one extra output (the comparison, a rendition) landed, and what it is."""

    uri: str
    poster: str
    bytes: int
    width: int
    height: int
    sha256: str

    @classmethod
    def of(cls, facts: dict, **extra):
        """From an output's facts (which hold more: frames, seconds, fps), with `extra` fields."""
        return cls(**{k: facts[k] for k in OutputFacts.model_fields}, **extra)


class Rendition(OutputFacts):
    name: str


class VideoFacts(BaseModel):
    """The item's main video, as its record and the endpoint's view of the item report it (None
    until it is rendered)."""

    uri: str | None = None
    bytes: int | None = None
    frames: int | None = None
    seconds: float | None = None
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None


class RenderRecord(VideoFacts, _Readable):
    """An item's record. Ok: the main output's facts are set; error: `error` says why."""

    id: str
    status: Literal["ok", "error"]
    mode: str
    poster: str | None = None
    renditions: list[Rendition] = []
    compare: OutputFacts | None = None
    model: str | None = None
    model_sha256: str | None = None
    seed: int | None = None
    label: int | str | None = None
    input: str | None = None
    spec_hash: str | None = None
    vidgen_version: str | None = None
    error: str | None = None
    rendered_at: str | None = None
    elapsed_s: float | None = None

    @property
    def is_ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def ok(cls, item, model, item_hash: str, results: dict[str, dict], elapsed_s: float | None = None) -> RenderRecord:
        """The record of an item whose outputs landed. `results`: output name -> its facts ("" the
        main video, COMPARE the comparison, else a rendition's name); `model`: an engine.ModelInfo."""
        main = results[""]
        return cls(
            id=item.id, status="ok", mode=item.mode,
            **{k: main[k] for k in ("uri", "poster", "bytes", "frames", "seconds", "fps", "width", "height", "sha256")},
            renditions=[Rendition.of(results[r.name], name=r.name) for r in item.renditions],
            compare=OutputFacts.of(results[COMPARE]) if item.compare else None,
            model=model.uri, model_sha256=model.sha256, seed=item.seed, label=item.label, input=item.input,
            spec_hash=item_hash, vidgen_version=__version__, rendered_at=_now(),
            elapsed_s=None if elapsed_s is None else round(elapsed_s, 3))

    @classmethod
    def failed(cls, item, model_uri: str | None, model_sha256: str | None, item_hash: str | None,
               error: str) -> RenderRecord:
        return cls(id=item.id, status="error", mode=item.mode, model=model_uri, model_sha256=model_sha256,
                   seed=item.seed, label=item.label, input=item.input, spec_hash=item_hash,
                   vidgen_version=__version__, error=error, rendered_at=_now())

    @classmethod
    def parse(cls, data: Any) -> RenderRecord | None:
        """A stored record, or None when it is not one (a hand edit, a foreign file)."""
        try:
            return cls.model_validate(data)
        except ValidationError:
            return None

    def repeats(self, other: RenderRecord | None) -> bool:
        """Whether this error record says what `other` (the stored one) says already."""
        return (other is not None and self.status == other.status == "error"
                and (self.error, self.spec_hash, self.model_sha256) == (other.error, other.spec_hash,
                                                                       other.model_sha256))

    def to_json(self) -> dict:
        return self.model_dump(mode="json")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
