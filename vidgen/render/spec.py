"""Render specs: a batch of items in YAML or JSON, validated as a whole before anything renders.

    name: spring-ads
    output: s3://bucket/renders/spring-ads
    model: s3://bucket/models/shapes-gan          # default model of the items
    defaults: {fps: 24, seconds: 4, size: [128, 128], codec: h264, crf: 23}
    items:
      - {id: sale-01, mode: generate, seed: 7, label: square, title: "Spring sale -20%",
         logo: s3://bucket/brand/logo.png, watermark: ACME, audio: s3://bucket/audio/jingle.m4a,
         renditions: [{name: 16x9, size: [256, 144]}, {name: 9x16, size: [144, 256], fit: pad}]}
      - {id: lecture-03, mode: restore, input: s3://bucket/raw/lecture-03.mp4, model: ..., compare: true}
    items_from: items.csv                          # more items, one per row, item fields as columns

    batch = load_batch("jobs/batches/ads.yaml")    # SpecError (a ValueError) names the bad field
    items = batch.resolve(manifests)               # defaults applied, labels by name -> index

Rules a user can rely on:
- `id`: letters, digits, `.`, `_`, `-`, starting with a letter or digit, at most 128 characters,
  no `--` (that separates an item from its renditions in output names); unique in the batch.
- Modes: `generate` (gan or vae; `seed` (default: derived from the id), `label` by index or name),
  `restore` (`input`; `compare: true` adds `<id>--compare.mp4`, input and output side by side),
  `stylize` (`input`), `predict` (`input`: its first frames are the context, then the model rolls
  out to `seconds` x `fps` frames in total).
- Timing: generate and predict take `fps` and `seconds` from the item, else `defaults`; restore and
  stylize keep the input's fps and length unless the item itself sets them.
- `size` [width, height] (or "WxH"), even sides in [MIN_SIDE, MAX_SIDE]: the model's native output
  is scaled to it by ffmpeg, fitted by `fit`: crop (fill, centre-crop; the default), pad (black
  bars) or stretch. Without a size an item keeps the model's native size.
- `renditions`: more outputs of the same item at other sizes, `<id>--<name>.mp4` each.
- Paths: `items_from` is relative to the spec file; every other local path is relative to the
  working directory (like any path on the command line); `s3://` URIs are absolute.
- Limits: MAX_ITEMS items, MAX_SECONDS seconds, MAX_FPS fps, MAX_SIDE pixels a side,
  MAX_RENDITIONS renditions an item.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from vidgen import storage
from vidgen.errors import InputError
from vidgen.manifest import ModelManifest

MAX_ITEMS = 1000
MAX_SECONDS = 600.0
MAX_FPS = 120.0
MAX_SIDE = 4096
MIN_SIDE = 16
MAX_RENDITIONS = 8
MAX_TEXT = 500  # characters of a title or watermark

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
RENDITION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$"
COMPARE = "compare"  # the output name of restore's side-by-side video; no rendition may take it

MODES = ("generate", "restore", "stylize", "predict")
INPUT_MODES = ("restore", "stylize", "predict")

Mode = Literal["generate", "restore", "stylize", "predict"]
Fit = Literal["crop", "pad", "stretch"]
Codec = Literal["h264", "vp9"]
Preset = Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"]
Corner = Literal["top-left", "top-right", "bottom-left", "bottom-right"]


class SpecError(InputError):
    """A render spec that cannot run; the message names the field (`items[2] (sale-01).label: ...`)."""


def _parse_size(value: Any) -> Any:
    """[w, h] or "WxH" -> (w, h), checked: even sides in [MIN_SIDE, MAX_SIDE]."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
        if not m:
            raise ValueError(f"size {value!r}: expected [width, height] or 'WIDTHxHEIGHT'")
        value = (int(m[1]), int(m[2]))
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"size {value!r}: expected [width, height]")
    if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise ValueError(f"size {value!r}: expected two integers [width, height]")
    w, h = value
    for side in (w, h):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise ValueError(f"size {[w, h]}: each side must be in [{MIN_SIDE}, {MAX_SIDE}] pixels")
        if side % 2:
            raise ValueError(f"size {[w, h]}: sides must be even (H.264/VP9 store colour per 2x2 block)")
    return (w, h)


Size = Annotated[tuple[int, int], BeforeValidator(_parse_size)]
Fps = Annotated[float, Field(gt=0, le=MAX_FPS)]
Seconds = Annotated[float, Field(gt=0, le=MAX_SECONDS)]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]


def _uri(value: str | None) -> str | None:
    """A URI field: S3 URIs checked, local paths made absolute (relative to the working directory)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a URI or path")
    try:
        return storage.normalize(value.strip())
    except storage.StorageError as e:
        raise ValueError(str(e)) from None


URI = Annotated[str, BeforeValidator(_uri)]


class Rendition(BaseModel):
    """One more output of an item: `OUT/<id>--<name>.mp4` (and `.jpg`) at `size`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=RENDITION_PATTERN)
    size: Size
    fit: Fit | None = None  # None: the item's fit

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if "--" in v:
            raise ValueError(f"rendition name {v!r}: '--' separates item ids from rendition names")
        if v == COMPARE:
            raise ValueError(f"rendition name {v!r} is reserved for restore's comparison video")
        return v


class Defaults(BaseModel):
    """Values for items that do not set them; the one home of each default.

    fps and seconds apply to generate and predict items only: restore and stylize keep their
    input's fps and length unless the item itself sets them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    fps: Fps = 24.0
    seconds: Seconds = 4.0
    size: Size | None = None  # None: the model's native size
    fit: Fit = "crop"
    codec: Codec = "h264"
    crf: int = Field(23, ge=0, le=63)
    preset: Preset = "medium"
    logo: URI | None = None
    logo_corner: Corner = "top-right"
    watermark: Text | None = None
    audio: URI | None = None
    burn_subtitles: bool = True


class RenderItem(BaseModel):
    """One item as written in a spec; None means "from the defaults" (or "from the input")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=ID_PATTERN)
    mode: Mode
    model: URI | None = None
    input: URI | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    label: int | str | None = None
    fps: Fps | None = None
    seconds: Seconds | None = None
    size: Size | None = None
    fit: Fit | None = None
    codec: Codec | None = None
    crf: int | None = Field(None, ge=0, le=63)
    preset: Preset | None = None
    title: Text | None = None
    logo: URI | None = None
    logo_corner: Corner | None = None
    watermark: Text | None = None
    audio: URI | None = None
    subtitles: URI | None = None
    burn_subtitles: bool | None = None
    compare: bool = False
    renditions: list[Rendition] = Field(default_factory=list, max_length=MAX_RENDITIONS)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if "--" in v:
            raise ValueError(f"id {v!r}: '--' is reserved (it separates an item from its renditions)")
        return v

    @field_validator("label", mode="before")
    @classmethod
    def _label(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().isdigit():  # "2" from a CSV cell is the index 2
            return int(v)
        if isinstance(v, int) and not isinstance(v, bool) and v < 0:
            raise ValueError(f"label {v}: expected an index >= 0 or a label name")
        return v

    @model_validator(mode="after")
    def _mode_fields(self) -> RenderItem:
        if self.mode == "generate":
            if self.input is not None:
                raise ValueError("input: generate items take no input video (use mode restore, stylize or predict)")
        else:
            if self.input is None:
                raise ValueError(f"input: a {self.mode} item needs an input video URI")
            for name in ("seed", "label"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: only generate items take a {name} (this item is {self.mode})")
        if self.compare and self.mode != "restore":
            raise ValueError(f"compare: only restore items have a comparison video (this item is {self.mode})")
        names = [r.name for r in self.renditions]
        if len(set(names)) != len(names):
            raise ValueError(f"renditions: names must be unique, got {names}")
        if self.codec == "h264" and self.crf is not None and self.crf > 51:
            raise ValueError(f"crf {self.crf}: h264 takes 0..51")
        return self


class ResolvedRendition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    size: tuple[int, int]
    fit: Fit


class ResolvedItem(BaseModel):
    """An item with everything decided: defaults applied, model chosen, label as an index when
    the model's label names are known. Its JSON (plus the model digest) is the spec hash."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    mode: Mode
    model: str
    input: str | None
    seed: int | None
    label: int | str | None
    fps: float | None  # None: the input's (restore, stylize)
    seconds: float | None  # None: the input's length (restore, stylize)
    size: tuple[int, int] | None  # None: the model's native size
    fit: Fit
    codec: Codec
    crf: int
    preset: Preset
    title: str | None
    logo: str | None
    logo_corner: Corner
    watermark: str | None
    audio: str | None
    subtitles: str | None
    burn_subtitles: bool
    compare: bool
    renditions: tuple[ResolvedRendition, ...]

    @property
    def num_frames(self) -> int | None:
        """Frames to render, when the spec decides it (generate, predict, or an item that sets both)."""
        if self.fps is None or self.seconds is None:
            return None
        return max(1, round(self.fps * self.seconds))


class RenderBatch(BaseModel):
    """A whole render spec. `items_from` rows are merged into `items` by `load_batch`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    output: URI
    model: URI | None = None
    defaults: Defaults = Field(default_factory=Defaults)
    items: list[RenderItem] = Field(default_factory=list)
    items_from: str | None = None  # as written; load_batch has already read it

    @model_validator(mode="after")
    def _batch(self) -> RenderBatch:
        if not self.items:
            raise ValueError("items: the batch has no items (give items, items_from, or both)")
        if len(self.items) > MAX_ITEMS:
            raise ValueError(f"items: {len(self.items)} items, at most {MAX_ITEMS} per batch")
        seen: set[str] = set()
        for item in self.items:
            if item.id in seen:
                raise ValueError(f"items: id {item.id!r} appears more than once; ids must be unique")
            seen.add(item.id)
            if item.model is None and self.model is None:
                raise ValueError(f"items: item {item.id!r} names no model and the batch has no default model")
        return self

    def models(self) -> list[str]:
        """The distinct model URIs the items use, in first-use order."""
        return list(dict.fromkeys(item.model or self.model for item in self.items))

    def resolve(self, manifests: dict[str, ModelManifest | None] | None = None) -> list[ResolvedItem]:
        """Items with defaults applied. `manifests` (model URI -> model.json, or None when it cannot
        be read) lets labels by name become indices and be checked now; a label the model does not
        know is a SpecError naming the item."""
        manifests = manifests or {}
        return [_resolve(self, i, item, manifests.get(item.model or self.model)) for i, item in enumerate(self.items)]


def _resolve(batch: RenderBatch, index: int, item: RenderItem, manifest: ModelManifest | None) -> ResolvedItem:
    d = batch.defaults
    timed = item.mode in ("generate", "predict")
    fit = item.fit or d.fit
    codec = item.codec or d.codec
    crf = item.crf if item.crf is not None else d.crf
    where = f"items[{index}] ({item.id})"
    if codec == "h264" and crf > 51:
        raise SpecError(f"{where}.crf: {crf} is out of range for h264 (0..51)")
    seed = item.seed
    if item.mode == "generate" and seed is None:
        seed = default_seed(item.id)
    return ResolvedItem(
        id=item.id,
        mode=item.mode,
        model=item.model or batch.model,
        input=item.input,
        seed=seed,
        label=_resolve_label(item.label, manifest, f"{where}.label", item.model or batch.model),
        fps=item.fps if item.fps is not None else (d.fps if timed else None),
        seconds=item.seconds if item.seconds is not None else (d.seconds if timed else None),
        size=item.size or d.size,
        fit=fit,
        codec=codec,
        crf=crf,
        preset=item.preset or d.preset,
        title=item.title,
        logo=item.logo or d.logo,
        logo_corner=item.logo_corner or d.logo_corner,
        watermark=item.watermark or d.watermark,
        audio=item.audio or d.audio,
        subtitles=item.subtitles,
        burn_subtitles=item.burn_subtitles if item.burn_subtitles is not None else d.burn_subtitles,
        compare=item.compare,
        renditions=tuple(ResolvedRendition(name=r.name, size=r.size, fit=r.fit or fit) for r in item.renditions),
    )


def default_seed(item_id: str) -> int:
    """The seed of a generate item that sets none: stable per id, so re-runs render the same video."""
    return int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:4], "big") & 0x7FFFFFFF


def _resolve_label(label: int | str | None, manifest: ModelManifest | None, where: str, model: str) -> int | str | None:
    if label is None or manifest is None:
        return label  # an unreadable model: checked when it renders
    classes, names = manifest.render.num_classes, manifest.label_names or []
    if classes == 0:
        raise SpecError(f"{where}: the model {model} is unconditional ({manifest.family}); remove the label")
    if isinstance(label, str):
        if label not in names:
            known = ", ".join(names) if names else "none (it has no label names; use an index)"
            raise SpecError(f"{where}: unknown label {label!r}; the model {model} knows {known}")
        return names.index(label)
    if not 0 <= label < classes:
        raise SpecError(f"{where}: label {label} is out of range: the model {model} has {classes} classes")
    return label


# --------------------------------------------------------------------------------------------
# Loading


def load_batch(uri: str, out: str | None = None, model: str | None = None) -> RenderBatch:
    """Read and validate a spec (YAML or JSON, local or s3://). `out` and `model` override the
    spec's `output` and default `model` (the command line's --out/--model). Raises SpecError."""
    text = storage.read_spec_text(uri, "render spec", SpecError)
    try:
        data = json.loads(text) if uri.lower().endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        kind = "JSON" if uri.lower().endswith(".json") else "YAML"
        raise SpecError(f"{uri}: not valid {kind} ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{uri}: expected a mapping with name, output, model, defaults and items")
    if out is not None:
        data["output"] = out
    if model is not None:
        data["model"] = model
    return parse_batch(data, source=uri)


def parse_batch(data: dict[str, Any], source: str = "spec") -> RenderBatch:
    """Validate a spec given as a dict (from a file, or an HTTP request body). `items_from` is read
    relative to `source` when source is a spec file's URI."""
    data = dict(data)
    items = data.get("items") or []
    if not isinstance(items, list):
        raise SpecError(f"{source}: items: expected a list of items")
    origins = [f"items[{i}]" for i in range(len(items))]
    if data.get("items_from") is not None:
        rows, row_origins = _read_items_from(str(data["items_from"]), source)
        items = [*items, *rows]
        origins += row_origins
    data["items"] = items
    try:
        return RenderBatch(**data)
    except ValidationError as e:
        raise SpecError(f"{source}: {_describe(e, items, origins)}") from None
    except TypeError as e:
        raise SpecError(f"{source}: {e}") from None


def _read_items_from(ref: str, source: str) -> tuple[list[dict], list[str]]:
    """Rows of a CSV (header = item fields) as item dicts; empty cells are left out."""
    uri = _relative_to(source, ref)
    try:
        text = storage.read_text(uri)
    except storage.StorageError as e:
        raise SpecError(f"{source}: items_from: {e}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{source}: items_from: {uri} is not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    if not reader.fieldnames:
        raise SpecError(f"{source}: items_from: {uri} has no header row")
    rows, origins = [], []
    name = posixpath.basename(uri.replace("\\", "/"))
    for row in reader:
        if None in row:
            raise SpecError(f"{source}: items_from: {name} line {reader.line_num}: more cells than header columns")
        item = {k.strip(): _cell(v) for k, v in row.items() if k and v is not None and v.strip() != ""}
        if item:
            rows.append(item)
            origins.append(f"items_from {name} line {reader.line_num}")
    return rows, origins


def _cell(value: str) -> Any:
    """A CSV cell: JSON lists/objects (size, renditions) are parsed; everything else stays text
    (pydantic turns "7" into 7 and "true" into True where the field wants it)."""
    v = value.strip()
    if v[:1] in "[{":
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def _relative_to(source: str, ref: str) -> str:
    """`ref` as written in the spec at `source`: absolute URIs as they are, relative ones beside it."""
    if storage.is_s3(ref) or ref.startswith(("/", "file://")) or "://" in ref or source == "spec":
        return storage.normalize(ref)
    return storage.join(storage.parent(storage.normalize(source)), ref)


def _describe(error: ValidationError, items: list, origins: list[str]) -> str:
    """The first error (an unknown field first: it explains the rest) as `where.field: message`."""
    errors = error.errors()
    err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    loc = list(err["loc"])
    where = ""
    if len(loc) >= 2 and loc[0] == "items" and isinstance(loc[1], int):
        i = loc[1]
        item_id = items[i].get("id") if i < len(items) and isinstance(items[i], dict) else None
        where = origins[i] if i < len(origins) else f"items[{i}]"
        if item_id is not None:
            where += f" ({item_id})"
        loc = loc[2:]
    field = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
    msg = re.sub(r"^(Value|Assertion) error, ", "", err["msg"])
    named = re.match(r"^(\w+): (.*)$", msg)
    if named and not field:  # a whole-item/batch check that names its field: `input: ...`
        field, msg = named[1], named[2]
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "missing":
        msg = "required field is missing"
    path = ".".join(p for p in (where, field) if p) or "spec"
    value = err.get("input")
    shown = f" = {value!r}" if err["type"] not in ("missing", "extra_forbidden") and isinstance(
        value, (str, int, float, bool)) and len(repr(value)) < 80 else ""
    more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{path}{shown}: {msg}{more}"
