"""A saved model's model.json as a typed record, read and written without torch: the render driver
and the HTTP ingress plan from it; the model workers load the weights it names.

    manifest = ModelManifest.read("s3://bucket/models/ads", families=("gan",))
    manifest.family, manifest.digest, manifest.render.num_classes, manifest.render.scale

`vidgen.models.save` writes it (the commit marker of a save, after the weights) and
`vidgen.models.load` checks the weights against `weights_sha256`. Every default lives here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from vidgen import storage
from vidgen.errors import InputError

FORMAT = "vidgen-model/1"
MANIFEST = "model.json"
WEIGHTS = "model.safetensors"

# Which families render each mode, without importing them (torch): the built-in families'
# `render_modes` (a test keeps the two equal); `vidgen.models.register` adds a new family's. A
# model.json names its own modes (`render.modes`); this index fills them in for a model.json from
# before that field, and names the families an error suggests for a mode.
MODE_FAMILIES: dict[str, tuple[str, ...]] = {
    "generate": ("gan", "vae"), "restore": ("restore",), "stylize": ("style",), "predict": ("convlstm",)}


class RenderCapabilities(BaseModel):
    """What the render stages need to know about a model before loading it (the family's answers
    at save time): labels an item may ask for, and the output size over the input size."""

    model_config = ConfigDict(frozen=True, extra="allow")

    modes: tuple[str, ...] = ()    # the render modes it serves (the family's `render_modes`)
    num_classes: int = 0           # > 0: a generate item may ask for a label
    scale: int = 1                 # restore: output side / input side
    frame_size: int | None = None  # generate: the side of the frames it samples


class ModelManifest(BaseModel):
    """URI/model.json. Unknown keys (a newer vidgen's) are kept, so a copy loses nothing."""

    model_config = ConfigDict(frozen=True, extra="allow", protected_namespaces=())

    format: str
    family: str
    preset: str | None = None
    config: dict[str, Any] = {}
    label_names: list[str] | None = None
    provenance: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    vidgen_version: str | None = None
    weights_sha256: str | None = None
    parameters: int | None = None
    render: RenderCapabilities = RenderCapabilities()

    @model_validator(mode="before")
    @classmethod
    def _render_of_older_saves(cls, data: Any) -> Any:
        """A model.json written before the `render` block, or before its `modes`: its family config
        and family said the same."""
        if not isinstance(data, dict):
            return data
        render = data.get("render")
        if render is None:
            config = data.get("config") if isinstance(data.get("config"), dict) else {}
            render = {"num_classes": int(config.get("num_classes") or 0), "scale": int(config.get("scale") or 1),
                      "frame_size": config.get("frame_size")}
        if isinstance(render, dict) and "modes" not in render:
            render = {**render, "modes": [m for m, families in MODE_FAMILIES.items() if data.get("family") in families]}
        return {**data, "render": render}

    @field_validator("config", "provenance", "metrics")
    @classmethod
    def _as_json(cls, value: dict[str, Any]) -> dict[str, Any]:
        """As JSON gives it back (tuples as lists), so a saved manifest equals the one read."""
        return json.loads(json.dumps(value))

    @property
    def digest(self) -> str:
        """What a render record names the model by: the weights' sha256 (or, for a manifest
        without one, the manifest's own)."""
        return self.weights_sha256 or hashlib.sha256(
            json.dumps(self.model_dump(mode="json", exclude={"render"}), sort_keys=True).encode()).hexdigest()

    def mode_problem(self, mode: str, name: str) -> str | None:
        """None when this model renders `mode`; else the one-line reason, naming the model `name`."""
        if mode in self.render.modes:
            return None
        return mode_error(mode, self.family, name)

    @classmethod
    def parse(cls, data: Any, where: str, families: Iterable[str]) -> ModelManifest:
        """`data` (decoded JSON) checked for format and family; an InputError naming `where` otherwise."""
        families = sorted(families)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise InputError(f"{where}: not a vidgen model (format {found!r}, expected {FORMAT!r})")
        if data.get("family") not in families:
            raise InputError(f"{where}: unknown model family {data.get('family')!r}; expected one of {families}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "model.json"
            raise InputError(f"{where}: {field}: {first['msg']}") from None

    @classmethod
    def read(cls, uri: str, families: Iterable[str]) -> ModelManifest:
        """The manifest of the model saved at `uri` (StorageError when it cannot be read)."""
        where = storage.join(uri, MANIFEST)
        try:
            data = json.loads(storage.read_bytes(where))
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not JSON ({e})") from None
        return cls.parse(data, where, families)

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=2).encode()


def mode_error(mode: str, family: str, name: str) -> str:
    """What to tell a user who asked a `family` model for a mode it does not render."""
    need = " or ".join(MODE_FAMILIES.get(mode, ())) or "another"
    return f"model {name} is a {family} model; mode {mode} needs a {need} model"
