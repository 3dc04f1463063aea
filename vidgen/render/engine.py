"""The render engine: items -> model inference -> videos with overlays -> posters -> records.

Plain functions that the offline batch (`vidgen.render.batch`, on Ray) and the serving path share:

    for event in infer(model, items):       # [Begin(index, meta)], Chunk(index, stream, frames) ..., Done / Failed
        ...
    record = encode_item(item, out, meta, frames, model_info, spec_hash(item, digest))  # frames: (stream, chunk)
    records = render_items(items, model, out, model_info)   # both, in this process

`infer` takes a list of compatible items (same model and mode; generate items of one length are
sampled as one batch, so a server can batch across requests) and streams uint8 frames (t, H, W, 3)
in chunks of at most CHUNK_FRAMES. A restore or stylize item (any length) starts with Begin(meta)
and is encoded as its chunks come (`item_frames`): its video never exists whole, on either side.

Outputs of an item under OUT (all relative names, so a gallery page can link them):
    <id>.mp4 / <id>.webm     the item at its size (H.264 or VP9), overlays drawn, audio and subtitles muxed
    <id>.jpg                 its poster (the middle frame of the encoded video)
    <id>--<name>.mp4/.jpg    each rendition: the same frames fitted to the rendition's size
    <id>--compare.mp4/.jpg   restore with `compare: true`: input (left) and output (right)
    items/<id>.json          the record (render/record.py), written after all of the above: the commit marker
Each object is one PUT (or a completed multipart upload), so a killed render leaves no partial
object. On S3 each video and poster carries its spec hash in its user metadata (`x-amz-meta-vidgen-*`),
so a re-run after a kill adopts objects that landed before the record did instead of uploading them again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import queue
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from vidgen import __version__, media, storage
from vidgen.manifest import ModelManifest, mode_error
from vidgen.render.record import RenderRecord
from vidgen.render.spec import COMPARE, MAX_SIDE, ResolvedItem

# torch is imported by the inference functions only: encode/upload workers never load it.

RENDER_FORMAT = "vidgen-render/1"
CHUNK_FRAMES = 64  # frames per inference/encode chunk: bounds memory for any video length
CHUNK_PIXELS = 64 * 256 * 256  # and pixels (frames x output height x width) per chunk of a streamed item:
                               # 854x480 frames go 10 at a time (12 MB a chunk in uint8, 49 MB as floats)
META = "vidgen-"  # prefix of our S3 user metadata keys


class ItemError(Exception):
    """One item cannot render (missing input, corrupt video, wrong model); the message is its record's error."""


@dataclass(frozen=True)
class ModelInfo:
    """What a record says about the model: where, which family, the digest of its weights."""

    uri: str
    family: str
    sha256: str
    label_names: tuple[str, ...] | None = None
    num_classes: int = 0
    scale: int = 1  # output size / input size (restore)

    @classmethod
    def from_manifest(cls, uri: str, manifest: ModelManifest) -> ModelInfo:
        names = manifest.label_names
        return cls(uri, manifest.family, manifest.digest, tuple(names) if names else None,
                   manifest.render.num_classes, manifest.render.scale)


def spec_hash(item: ResolvedItem, model_sha256: str) -> str:
    """sha256 of the resolved item and the model's weights digest: an edited item, or new weights,
    renders again; the model's URI is left out (the digest says which model it is)."""
    spec = item.model_dump(mode="json", exclude={"model"})
    payload = json.dumps({"format": RENDER_FORMAT, "item": spec, "model_sha256": model_sha256},
                         sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def check_mode(mode: str, model, model_uri: str) -> None:
    """ItemError unless the loaded `model`'s family renders `mode` (its `render_modes`)."""
    from vidgen import models

    if mode not in model.render_modes:
        raise ItemError(mode_error(mode, models.family_of(model), model_uri))


# --------------------------------------------------------------------------------------------
# Outputs of an item


@dataclass(frozen=True)
class Output:
    """One video (and its poster) of an item: the main one (name ""), a rendition, or the comparison."""

    name: str
    video: str
    poster: str
    size: tuple[int, int] | None  # None: the native size
    fit: str
    overlays: bool


def item_outputs(item: ResolvedItem, out: str) -> list[Output]:
    ext = media.container_for(item.codec)
    outputs = [Output("", storage.join(out, f"{item.id}.{ext}"), storage.join(out, f"{item.id}.jpg"),
                      item.size, item.fit, True)]
    for r in item.renditions:
        stem = f"{item.id}--{r.name}"
        outputs.append(Output(r.name, storage.join(out, f"{stem}.{ext}"), storage.join(out, f"{stem}.jpg"),
                              r.size, r.fit, True))
    if item.compare:
        stem = f"{item.id}--{COMPARE}"
        size = (2 * item.size[0], item.size[1]) if item.size else None
        outputs.append(Output(COMPARE, storage.join(out, f"{stem}.{ext}"), storage.join(out, f"{stem}.jpg"),
                              size, item.fit, False))
    return outputs


def record_uri(out: str, item_id: str) -> str:
    return storage.join(out, "items", f"{item_id}.json")


# --------------------------------------------------------------------------------------------
# Inference: items -> streams of uint8 frame chunks


@dataclass
class Begin:
    index: int
    meta: dict  # fps, width, height (native), scale: what an encoder needs before the first frame


@dataclass
class Chunk:
    index: int  # which item of the list
    stream: str  # "video" (the output) or "input" (restore's input frames, for the comparison)
    frames: np.ndarray  # uint8 (t, H, W, 3)


@dataclass
class Done:
    index: int
    meta: dict  # fps, frames, width, height (native), scale (restore)


@dataclass
class Failed:
    index: int
    error: str


Event = Begin | Chunk | Done | Failed

STREAMED_MODES = ("restore", "stylize")  # one item at a time, Begin first: encoded while it is inferred


def infer(model, items: list[ResolvedItem], chunk_frames: int = CHUNK_FRAMES) -> Iterator[Event]:
    """Run the model for `items`, streaming Chunk events, then Done or Failed for each item.

    A failing item yields Failed (chunks it already yielded are to be dropped); the others go on.
    Generate items with the same length are sampled together as one batch. A restore or stylize
    item (STREAMED_MODES) comes whole, one after another, Begin(meta) first, so its encode can
    start with its first chunk: its video is never held whole (any length, bounded memory).
    """
    from vidgen import models

    family = models.family_of(model)
    ready: list[tuple[int, ResolvedItem]] = []
    for i, item in enumerate(items):
        try:
            check_mode(item.mode, model, item.model)
            if item.mode == "generate":
                _check_label(model, family, item)  # (a generate family: `num_classes`)
            ready.append((i, item))
        except ItemError as e:
            yield Failed(i, str(e))
    generate = [(i, it) for i, it in ready if it.mode == "generate"]
    predict = [(i, it) for i, it in ready if it.mode == "predict"]
    for frames in dict.fromkeys(it.num_frames for _, it in generate):
        group = [(i, it) for i, it in generate if it.num_frames == frames]
        yield from _guard([i for i, _ in group], _generate(model, group, chunk_frames))
    if predict:
        yield from _predict(model, predict, chunk_frames)
    for i, item in ready:
        if item.mode in STREAMED_MODES:
            yield from _guard([i], _transform(model, i, item, chunk_frames))


def item_frames(events: Iterator[Event], index: int) -> Iterator[tuple[str, np.ndarray]]:
    """The (stream, frames) chunks of item `index` from `events` (after its Begin), up to its Done;
    ItemError at its Failed. Leaves `events` at the event after the item's last one."""
    for event in events:
        if event.index != index:
            raise RuntimeError(f"item {index}'s events were interleaved with item {event.index}'s")
        if isinstance(event, Chunk):
            yield event.stream, event.frames
        elif isinstance(event, Done):
            return
        elif isinstance(event, Failed):
            raise ItemError(event.error)


def _guard(indices: list[int], events: Iterator[Event]) -> Iterator[Event]:
    """Pass events through; an exception fails the items that have not finished (and only those)."""
    open_items = set(indices)
    try:
        for event in events:
            if isinstance(event, (Done, Failed)):
                open_items.discard(event.index)
            yield event
    except Exception as e:  # noqa: BLE001 - one item's failure is recorded, never the batch's
        for i in sorted(open_items):
            yield Failed(i, _describe(e))


def _describe(e: BaseException) -> str:
    if isinstance(e, (ItemError, media.MediaError, storage.StorageError)):
        return str(e)
    return f"{type(e).__name__}: {e}"


def _device(model):
    return next(model.parameters()).device


def _check_label(model, family: str, item: ResolvedItem) -> None:
    label = item.label
    if label is None:
        return
    classes = model.num_classes
    if classes == 0:
        raise ItemError(f"label: the model {item.model} is unconditional ({family}); remove the label")
    if isinstance(label, str):
        if not model.label_names or label not in model.label_names:
            raise ItemError(f"label: unknown label {label!r}; the model {item.model} knows {model.label_names}")
    elif not 0 <= label < classes:
        raise ItemError(f"label: {label} is out of range: the model {item.model} has {classes} classes")


def _generate(model, group: list[tuple[int, ResolvedItem]], chunk_frames: int) -> Iterator[Event]:
    from vidgen.data.tensors import video_to_frames

    num_frames = group[0][1].num_frames
    labels = [it.label for _, it in group]
    per_item = max(1, chunk_frames // len(group))  # at most chunk_frames frames in one forward pass
    chunks = model.sample_chunks([it.seed for _, it in group], num_frames,
                                 None if all(label is None for label in labels) else labels, per_item)
    height = width = None
    for chunk in chunks:  # (n, C, t, H, W): the frames' size is what the model samples
        height, width = chunk.shape[-2:]
        for j, (i, _) in enumerate(group):
            yield Chunk(i, "video", video_to_frames(chunk[j]))
    for i, item in group:
        yield Done(i, {"fps": item.fps, "frames": num_frames, "width": width, "height": height, "scale": 1})


def _probe_input(item: ResolvedItem) -> media.VideoInfo:
    try:
        return media.probe(item.input)
    except media.MediaError as e:
        raise ItemError(f"input: {e}") from None


def _frames_wanted(item: ResolvedItem, info: media.VideoInfo, fps: float) -> int | None:
    if item.seconds is None:
        return None
    wanted = max(1, round(item.seconds * fps))
    if wanted > round(info.seconds * fps) + 1:
        raise ItemError(f"seconds: the item asks for {item.seconds:g} s but its input {item.input} "
                        f"is {info.seconds:.2f} s long")
    return wanted


def _transform(model, i: int, item: ResolvedItem, chunk_frames: int) -> Iterator[Event]:
    """restore / stylize: the input, chunk by chunk, through the model's `transform`, at the input's
    resolution cut down to a multiple of the model's `input_multiple` (the style family's: 4)."""
    from vidgen.data.tensors import frames_to_video, video_to_frames

    info = _probe_input(item)
    fps = item.fps or info.fps
    wanted = _frames_wanted(item, info, fps)
    scale, radius, m = model.render_scale, model.render_radius, model.input_multiple
    w, h = info.width // m * m, info.height // m * m
    if not (w and h):
        raise ItemError(f"input: {item.input} is {info.width}x{info.height}; {item.mode} needs at least {m}x{m}")
    size, fn = ((w, h) if (w, h) != (info.width, info.height) else None), model.transform
    width, height = size or (info.width, info.height)
    if max(width, height) * scale > MAX_SIDE:
        raise ItemError(f"input: {item.input} is {info.width}x{info.height}; the model's output would be "
                        f"{width * scale}x{height * scale}, more than {MAX_SIDE} pixels a side")
    device = _device(model)

    def run(frames: np.ndarray) -> np.ndarray:  # uint8 (t, h, w, 3) -> uint8 (t, h * s, w * s, 3)
        return video_to_frames(fn(frames_to_video(frames).to(device))[0])

    chunk_frames = max(radius + 1, min(chunk_frames, CHUNK_PIXELS // (width * height * scale * scale)))
    try:
        chunks = media.iter_decode(item.input, chunk_frames, size=size, fps=item.fps, max_frames=wanted)
    except media.MediaError as e:
        raise ItemError(f"input: {e}") from None
    meta = {"fps": fps, "width": width * scale, "height": height * scale, "scale": scale}
    yield Begin(i, meta)
    count = 0
    for frames, output in _windowed(chunks, radius, run):
        yield Chunk(i, "video", output)
        if item.compare:
            yield Chunk(i, "input", frames)
        count += len(frames)
    if count == 0:
        raise ItemError(f"input: {item.input} has no frames to {item.mode}")
    yield Done(i, {**meta, "frames": count})


def _windowed(chunks: Iterable[np.ndarray], radius: int, fn: Callable[[np.ndarray], np.ndarray]):
    """(chunk, fn(chunk)) for each chunk, where fn's output frame t reads input frames t-r..t+r:
    each chunk is run with `radius` real frames of its neighbours on both sides (then cut off), so
    the result equals fn over the whole video, with one chunk of lookahead in memory."""
    if radius == 0:
        for chunk in chunks:
            yield chunk, fn(chunk)
        return
    before = None
    pending = None
    for nxt in chunks:
        if pending is not None:
            yield pending, _run_with_context(fn, before, pending, nxt[:radius])
            before = pending[-radius:] if before is None else np.concatenate([before, pending])[-radius:]
        pending = nxt
    if pending is not None:
        yield pending, _run_with_context(fn, before, pending, None)


def _run_with_context(fn, before, chunk, after) -> np.ndarray:
    parts = [p for p in (before, chunk, after) if p is not None and len(p)]
    out = fn(np.concatenate(parts) if len(parts) > 1 else chunk)
    start = 0 if before is None else len(before)
    return out[start:start + len(chunk)]


def _predict(model, entries: list[tuple[int, ResolvedItem]], chunk_frames: int) -> Iterator[Event]:
    """predict: each input's first context_frames frames (at the item's fps), then the model's rollout
    to seconds x fps frames in total. Items whose contexts have one shape are predicted as a batch."""
    k = model.context_frames
    factor = model.input_multiple
    ready: dict[tuple, list[tuple[int, ResolvedItem, np.ndarray]]] = {}
    for i, item in entries:
        try:
            info = _probe_input(item)
            w, h = info.width // factor * factor, info.height // factor * factor
            if not (w and h):
                raise ItemError(f"input: {item.input} is {info.width}x{info.height}; this model needs "
                                f"at least {factor}x{factor}")
            if max(w, h) > MAX_SIDE:
                raise ItemError(f"input: {item.input} is {info.width}x{info.height}, more than {MAX_SIDE} a side")
            total = item.num_frames
            if total <= k:
                raise ItemError(f"seconds: {item.seconds:g} s at {item.fps:g} fps is {total} frames; predict "
                                f"needs more than the model's {k} context frames")
            size = (w, h) if (w, h) != (info.width, info.height) else None
            try:
                context = media.decode(item.input, size=size, fps=item.fps, max_frames=k)
            except media.MediaError as e:
                raise ItemError(f"input: {e}") from None
            if len(context) < k:
                raise ItemError(f"input: {item.input} has {len(context)} frames at {item.fps:g} fps; the model "
                                f"needs {k} context frames")
            ready.setdefault((context.shape, total), []).append((i, item, context))
        except Exception as e:  # noqa: BLE001 - recorded on the item
            yield Failed(i, _describe(e))
    device = _device(model)
    for (shape, total), group in ready.items():
        yield from _guard([i for i, _, _ in group], _rollout(model, group, k, total, shape, chunk_frames, device))


def _rollout(model, group, k: int, total: int, shape, chunk_frames: int, device) -> Iterator[Event]:
    import torch

    from vidgen.data.tensors import frames_to_video, video_to_frames

    for i, _, context in group:
        yield Chunk(i, "video", context)  # the real frames come first, then what the model sees next
    contexts = torch.cat([frames_to_video(c) for _, _, c in group]).to(device)  # (n, C, k, H, W)
    for chunk in model.predict_chunks(contexts, total - k, chunk_frames):
        for j, (i, _, _) in enumerate(group):
            yield Chunk(i, "video", video_to_frames(chunk[j]))
    for i, item, _ in group:
        yield Done(i, {"fps": item.fps, "frames": total, "width": shape[2], "height": shape[1], "scale": 1})


# --------------------------------------------------------------------------------------------
# Encoding, posters, uploads, the record


Frames = Iterable[tuple[str, np.ndarray]]  # one pass over an item's (stream, uint8 chunk) pairs


def encode_item(
    item: ResolvedItem,
    out: str,
    meta: dict,
    frames: Frames,
    model: ModelInfo,
    item_hash: str,
    previous: RenderRecord | None = None,
    resume: bool = False,
    threads: int | None = None,
    retry_killed: bool = False,
) -> RenderRecord:
    """Encode, poster and upload every output of one item, then write its record; returns the record.

    `frames` is read once, as it comes (a streamed item's chunks arrive while it is inferred): each
    output (the video, its renditions, the comparison) is encoded from the same pass, at the same
    time (see `_fan_out`). With `resume` (some outputs exist: a killed run), objects already on S3
    with this spec hash are kept, not uploaded again. An error, from the frames (an ItemError) or an
    encode, becomes the item's error record. `threads`: the encoder's threads (see `media.encode`).
    With `retry_killed` (a Ray encode task), an ffmpeg killed by a signal is raised instead: the task
    is being cancelled or its worker torn down (Ray kills its children first, so a stopped item would
    be recorded as an error), and the caller infers and encodes the item again.
    """
    started = time.monotonic()
    try:
        outputs = item_outputs(item, out)
        results, todo = {}, []
        for output in outputs:
            facts = resume and (adopt(output, item_hash) or _poster_from_landed_video(output, item_hash))
            if facts:
                results[output.name] = facts
            else:
                todo.append(output)
        encoders = [functools.partial(_encode_output, item, output, meta, model, item_hash, threads) for output in todo]
        for output, facts in zip(todo, _fan_out(frames, encoders) if todo else [], strict=True):
            results[output.name] = facts
        results = {o.name: results[o.name] for o in outputs}
        record = RenderRecord.ok(item, model, item_hash, results, time.monotonic() - started)
    except Exception as e:  # noqa: BLE001 - one item's failure is recorded, never the batch's
        if retry_killed and isinstance(e, media.EncoderKilledError):
            raise
        record = RenderRecord.failed(item, model.uri, model.sha256, item_hash, _describe(e))
    return write_record(out, record, previous)


FAN_OUT_CHUNKS = 2  # chunks queued for each output's encoder while another output's encoder is behind


def _fan_out(frames: Frames, encoders: list[Callable[[Iterator], dict]]) -> list[dict]:
    """Run every encoder over one pass of `frames`: one in this thread; several in threads, each
    fed through a queue of FAN_OUT_CHUNKS chunks (the slowest sets the pace; memory stays bounded).
    An encoder that fails stops being fed; a failing source ends every encoder, then raises."""
    if len(encoders) == 1:
        return [encoders[0](iter(frames))]
    queues = [queue.Queue(maxsize=FAN_OUT_CHUNKS) for _ in encoders]
    results: list = [None] * len(encoders)
    errors: list[BaseException | None] = [None] * len(encoders)
    ended = [threading.Event() for _ in encoders]

    def read(q: queue.Queue) -> Iterator:
        while (pair := q.get()) is not _END:
            if pair is _ABANDONED:
                raise ItemError("the item's frames ended early")
            yield pair

    def run(k: int) -> None:
        try:
            results[k] = encoders[k](read(queues[k]))
        except BaseException as e:  # noqa: BLE001 - raised below, in the caller's thread
            errors[k] = e
        finally:
            ended[k].set()

    def put(k: int, value) -> None:
        while not ended[k].is_set():
            try:
                return queues[k].put(value, timeout=0.1)
            except queue.Full:
                continue

    workers = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(len(encoders))]
    for w in workers:
        w.start()
    last = _ABANDONED
    try:
        for pair in frames:
            for k in range(len(encoders)):
                put(k, pair)
        last = _END
    finally:
        for k in range(len(encoders)):
            put(k, last)
        for w in workers:
            w.join()
    for e in errors:
        if e is not None:
            raise e
    return results


_END, _ABANDONED = object(), object()


def _poster_from_landed_video(output: Output, item_hash: str) -> dict | None:
    """Resuming: the video landed before a kill but its poster did not: the poster, made from it."""
    facts = _video_facts(output, item_hash)
    if facts is not None:
        poster = media.poster_jpeg(output.video)
        storage.write_bytes(output.poster, poster, "image/jpeg", metadata={f"{META}spec-hash": item_hash})
    return facts


def _encode_output(item: ResolvedItem, output: Output, meta: dict, model: ModelInfo, item_hash: str,
                   threads: int | None, frames: Iterator[tuple[str, np.ndarray]]) -> dict:
    if output.name == COMPARE:
        video = _side_by_side(frames, meta.get("scale", 1))
    else:
        video = (chunk for stream, chunk in frames if stream == "video")
    overlays = None
    if output.overlays:
        overlays = media.Overlays(title=item.title, logo=item.logo, logo_corner=item.logo_corner,
                                  watermark=item.watermark, audio=item.audio, subtitles=item.subtitles,
                                  burn_subtitles=item.burn_subtitles)
    provenance = {"vidgen": __version__, "item": item.id, "model": model.uri, "model_sha256": model.sha256,
                  "seed": item.seed, "label": item.label, "spec_hash": item_hash}
    tags = {"title": item.title or item.id, "comment": json.dumps(provenance, separators=(",", ":"))}
    ext = media.container_for(item.codec)
    with tempfile.TemporaryDirectory(prefix="vidgen-render-") as tmp:
        path = os.path.join(tmp, f"out.{ext}")
        encoded = media.encode_to(path, video, meta["fps"], item.codec, item.crf, item.preset, tags, overlays,
                                  size=output.size, fit=output.fit, threads=threads)
        poster = media.poster_jpeg(path)
        width, height = output.size or _native_size(output, meta)
        facts = {"uri": output.video, "poster": output.poster, "bytes": encoded.bytes, "frames": encoded.frames,
                 "seconds": round(encoded.seconds, 6), "fps": meta["fps"], "width": width, "height": height,
                 "sha256": encoded.sha256}
        object_meta = {f"{META}spec-hash": item_hash, f"{META}sha256": encoded.sha256,
                       f"{META}frames": str(encoded.frames), f"{META}fps": repr(float(meta["fps"])),
                       f"{META}width": str(width), f"{META}height": str(height)}
        storage.upload_file(path, output.video, encoded.content_type, metadata=object_meta)
    storage.write_bytes(output.poster, poster, "image/jpeg", metadata={f"{META}spec-hash": item_hash})
    return facts


def _native_size(output: Output, meta: dict) -> tuple[int, int]:
    w, h = meta["width"], meta["height"]
    w, h = w + w % 2, h + h % 2  # the encoder pads odd sides
    return (2 * w, h) if output.name == COMPARE else (w, h)


def _side_by_side(frames: Iterable[tuple[str, np.ndarray]], scale: int) -> Iterator[np.ndarray]:
    """Input (enlarged to the output's size, nearest neighbour: what the model was given) | output,
    frame by frame, from the item's "input" and "video" chunks in any chunking and order."""
    pending: dict[str, deque] = {"input": deque(), "video": deque()}
    for stream, chunk in frames:
        pending[stream].append(chunk)
        while pending["input"] and pending["video"]:
            before, after = pending["input"][0], pending["video"][0]
            n = min(len(before), len(after))
            for name, part in (("input", before), ("video", after)):
                pending[name].popleft()
                if len(part) > n:
                    pending[name].appendleft(part[n:])
            before, after = before[:n], after[:n]
            if scale > 1:
                before = before.repeat(scale, axis=1).repeat(scale, axis=2)
            yield np.concatenate([before, after], axis=2)
    if pending["input"] or pending["video"]:
        raise ItemError("compare: the input and the output have different lengths")


def adopt(output: Output, item_hash: str) -> dict | None:
    """The facts of an output (video and poster) already on S3 from an earlier (killed) run with
    this spec hash, or None."""
    facts = _video_facts(output, item_hash)
    if facts is None:
        return None
    poster = storage.stat(output.poster)
    if poster is None or poster.metadata.get(f"{META}spec-hash") != item_hash:
        return None
    return facts


def _video_facts(output: Output, item_hash: str) -> dict | None:
    """The facts of the output's video from its S3 metadata, when it has this spec hash."""
    if not storage.is_s3(output.video):
        return None  # local files carry no metadata; local renders simply run again
    video = storage.stat(output.video)
    if video is None or video.metadata.get(f"{META}spec-hash") != item_hash:
        return None
    m = video.metadata
    try:
        frames, fps = int(m[f"{META}frames"]), float(m[f"{META}fps"])
        return {"uri": output.video, "poster": output.poster, "bytes": video.bytes, "frames": frames,
                "seconds": round(frames / fps, 6), "fps": fps, "width": int(m[f"{META}width"]),
                "height": int(m[f"{META}height"]), "sha256": m[f"{META}sha256"]}
    except (KeyError, ValueError):
        return None


def write_record(out: str, record: RenderRecord, previous: RenderRecord | None = None) -> RenderRecord:
    """Write items/<id>.json and return the record now stored there: an error record that repeats
    the previous one is not rewritten (a re-run that fails the same way uploads nothing)."""
    if record.repeats(previous):
        return previous
    storage.write_json(record_uri(out, record.id), record.to_json())
    return record


# --------------------------------------------------------------------------------------------
# In one process: the serving path


def render_items(
    items: list[ResolvedItem],
    model,
    out: str,
    model_info: ModelInfo,
    chunk_frames: int = CHUNK_FRAMES,
    previous: dict[str, RenderRecord] | None = None,
    resume: bool = False,
) -> list[RenderRecord]:
    """Render compatible items with a loaded model in this process; one record per item, in order.
    A streamed item (restore, stylize) is encoded while it is inferred, chunk by chunk; the frames of
    a batch of generate or predict items are held until the batch is done (they finish together)."""
    previous = previous or {}
    buffers: dict[int, list[tuple[str, np.ndarray]]] = {}
    records: list[RenderRecord | None] = [None] * len(items)
    hashes = [spec_hash(item, model_info.sha256) for item in items]
    events = infer(model, items, chunk_frames)
    for event in events:
        i = event.index
        if isinstance(event, Begin):
            frames = item_frames(events, i)
            records[i] = encode_item(items[i], out, event.meta, frames, model_info, hashes[i],
                                     previous.get(items[i].id), resume)
            with contextlib.suppress(ItemError):  # an encode that failed early: its other events are passed over
                for _ in frames:
                    pass
        elif isinstance(event, Chunk):
            buffers.setdefault(i, []).append((event.stream, event.frames))
        elif isinstance(event, Done):
            records[i] = encode_item(items[i], out, event.meta, buffers.pop(i, []), model_info, hashes[i],
                                     previous.get(items[i].id), resume)
        else:
            buffers.pop(i, None)
            record = RenderRecord.failed(items[i], model_info.uri, model_info.sha256, hashes[i], event.error)
            records[i] = write_record(out, record, previous.get(items[i].id))
    return records
