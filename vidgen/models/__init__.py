"""The model families, and how models are built, saved and loaded.

    from vidgen import models
    model = models.build("gan", "tiny", num_classes=4, label_names=["a", "b", "c", "d"])
    models.save(model, "s3://bucket/models/gan-tiny", provenance={"run": "..."})
    model = models.load("s3://bucket/models/gan-tiny")
    video = model.sample(2, num_frames=16, seed=0)   # (2, 3, 16, 32, 32) in [-1, 1]

Tensors: models take and return float videos (B, C, T, H, W) in [-1, 1]; uint8 frames are
converted elsewhere (data and render code).

## The training contract (what vidgen.train relies on)

`vidgen.models.contract.Family` types the whole contract, training and what evaluation, export
and rendering ask of a family. `FAMILIES` maps each name to its class; `register(cls)` adds one
(a family defined outside this package, e.g. in a test).

Every family class (`FAMILIES` below) is an `nn.Module` that holds all its parts, so its
`state_dict()` has everything (the GAN's EMA generator included), and has:

- `Config`: a dataclass with `Config.preset(name, **overrides)` (`contract.Presets` gives it from the
  module's PRESETS); presets "tiny" (CPU tests), "small" (CPU demo, 64x64) and "base" (one GPU,
  128x128). An unknown preset, an unknown override key or a value of the wrong type raises ValueError
  naming it.
- `__init__(config)`; attributes `config`, `label_names: list[str] | None` (saved), `preset: str | None`.
- `parts() -> dict[str, nn.Module]`: the trainable parts, each with its own optimizer / DeepSpeed
  engine: `{"model": net}` for vae, convlstm, restore, style; `{"generator", "discriminator"}` for gan.
- `optimizer_settings(part) -> {"lr", "betas", "weight_decay"}`: defaults for AdamW.
- `train_steps() -> list[TrainStep]`, run in order each iteration. `TrainStep(part, loss)` with
  `loss(batch, modules) -> (loss tensor, {name: float})`. `batch` is `{"video": (B, C, T, H, W)
  float in [-1, 1], "label": (B,) long (optional)}`. `modules` maps every part name to a callable:
  the trainer passes the DeepSpeed engine for the part being stepped and the plain modules for the
  others. Loss functions only *call* parts (forward); they never call other methods on them or read
  their attributes. Randomness comes from the batch or the global torch RNG only.
  The GAN's steps are: "discriminator" (fake made under no_grad, exactly one D forward on
  `cat([real, fake.detach()])`), then "generator" (loss through `modules["discriminator"]`, which
  the trainer passes as D's plain module with its parameters frozen).
  The trainer moves the whole family module to the device before building engines (the style
  family's loss also uses its non-trainable feature extractor and style image). With bf16/fp16
  engines the trainer casts each part's floating inputs to the engines' dtype and its floating
  outputs back to float32 (`vidgen.train.parallelize.cast_at_boundary`); losses compute in float32.
- State outside the parts (the GAN's `generator_ema.*` and `ema_updates`, the style image) belongs
  to no engine: `extra_state(model)` returns it, and the trainer checkpoints it beside the engines.
- `after_step(part)`: call after each optimizer step of `part`. The GAN updates its EMA generator
  after the "generator" step, through `gan.ema_update(ema, model, decay)`, a plain function of two
  modules; under ZeRO-3 call `after_step` inside `GatheredParameters(generator.parameters())`.
- Inference, all videos (B, C, T, H, W) in [-1, 1], under no_grad:
  gan, vae  `sample(n, num_frames=None, labels=None, seed=None) -> (n, C, T, H, W)`
  vae       `reconstruct(video) -> video`
  convlstm  `predict(context (B, C, k, H, W), num_frames) -> (B, C, num_frames, H, W)`
  restore   `restore(video (B, C, T, H, W)) -> (B, C, T, H * scale, W * scale)`;
            `degrade(clean, seed)` makes training / evaluation inputs
  style     `stylize(video) -> video`; `set_style_image(image (C, H, W))`
  Generation and prediction roll out to any requested length; the same seed gives the same samples.

A minimal trainer, exactly as vidgen.train drives it (plain torch, no DeepSpeed):

    opts = {p: torch.optim.AdamW(m.parameters(), **model.optimizer_settings(p)) for p, m in model.parts().items()}
    for step in model.train_steps():
        others = [m for p, m in model.parts().items() if p != step.part]
        for m in others: m.requires_grad_(False)
        loss, scalars = step.loss(batch, model.parts())
        opts[step.part].zero_grad(); loss.backward(); opts[step.part].step()
        for m in others: m.requires_grad_(True)
        model.after_step(step.part)

## Artifacts

`save(model, uri)` writes `URI/model.safetensors` (the state dict) and then `URI/model.json`
(`vidgen.manifest.ModelManifest`: format, family, preset, config, label names, provenance, metrics,
vidgen version, weights sha256, and what rendering needs: its modes, classes, scale, frame size),
the json last: it is the commit marker. `load(uri)` reads only those two (no pickle) and checks the
config and the weights against each other.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from vidgen.errors import InputError
from vidgen.manifest import FORMAT, MANIFEST, WEIGHTS, ModelManifest, RenderCapabilities

from .contract import Batch, Family, TrainStep, config_from_dict
from .convlstm import ConvLSTM
from .gan import GAN
from .restore import Restorer
from .style import Stylizer
from .vae import VAE

FAMILIES: dict[str, type[nn.Module]] = {cls.name: cls for cls in (GAN, VAE, ConvLSTM, Restorer, Stylizer)}


__all__ = ["FAMILIES", "GAN", "VAE", "Batch", "ConvLSTM", "Family", "Restorer", "Stylizer", "TrainStep", "build",
           "extra_state", "family_class", "family_of", "load", "mode_families", "read_manifest", "register", "save",
           "unregister"]


def register(cls: type[nn.Module], replace: bool = False) -> type[nn.Module]:
    """Add a family class (one that implements `contract.Family`) under `cls.name`; returns it.
    Registering the same class again is a no-op; another class under a taken name is an error
    unless `replace` (a training worker takes the class its driver sent)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} has no family `name`")
    if not replace and FAMILIES.get(name, cls) is not cls:
        raise ValueError(f"model family {name!r} is already {FAMILIES[name].__name__}")
    FAMILIES[name] = cls
    from vidgen.manifest import MODE_FAMILIES  # the torch-free index of it

    for mode in cls.render_modes:
        if name not in MODE_FAMILIES.get(mode, ()):
            MODE_FAMILIES[mode] = (*MODE_FAMILIES.get(mode, ()), name)
    return cls


def unregister(name: str) -> None:
    """Remove a family `register` added (and its render modes from the torch-free index)."""
    from vidgen.manifest import MODE_FAMILIES

    FAMILIES.pop(name, None)
    for mode, names in MODE_FAMILIES.items():
        MODE_FAMILIES[mode] = tuple(n for n in names if n != name)


def mode_families() -> dict[str, tuple[str, ...]]:
    """Render mode -> the registered families that serve it, from each family's `render_modes`."""
    out: dict[str, tuple[str, ...]] = {}
    for name, cls in FAMILIES.items():
        for mode in cls.render_modes:
            out[mode] = (*out.get(mode, ()), name)
    return out


def family_class(family: str) -> type[nn.Module]:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[family]


def family_of(model: nn.Module) -> str:
    """The family name of a model instance ("gan", ...)."""
    for name, cls in FAMILIES.items():
        if type(model) is cls:
            return name
    raise ValueError(f"{type(model).__name__} is not a vidgen model family ({sorted(FAMILIES)})")


def build(family: str, preset: str = "tiny", *, label_names: list[str] | None = None, **overrides) -> nn.Module:
    """A new model of `family` from a preset with config overrides, e.g. build("vae", "small", width=48)."""
    cls = family_class(family)
    model = cls(cls.Config.preset(preset, **overrides))
    model.preset = preset
    _set_label_names(model, label_names)
    return model


def extra_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The entries of `model.state_dict()` that belong to no trainable part (checkpointed by the trainer)."""
    part_ids = {id(module) for module in model.parts().values()}
    prefixes = tuple(f"{name}." for name, child in model.named_children() if id(child) in part_ids)
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}


def _set_label_names(model: nn.Module, label_names) -> None:
    if label_names is not None:
        label_names = [str(name) for name in label_names]
        classes = getattr(model.config, "num_classes", None)
        if classes is not None and len(label_names) != classes:
            raise ValueError(f"{len(label_names)} label_names for a model with num_classes={classes}")
    model.label_names = label_names


def save(model: nn.Module, uri: str, provenance: dict | None = None, metrics: dict | None = None) -> ModelManifest:
    """Write URI/model.safetensors, then URI/model.json (the commit marker). Returns the manifest."""
    from vidgen import __version__, storage

    family = family_of(model)
    _set_label_names(model, model.label_names)  # validate before writing anything
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    weights = save_safetensors(state, metadata={"format": FORMAT, "family": family})
    manifest = ModelManifest(
        format=FORMAT,
        family=family,
        preset=model.preset,
        config=dataclasses.asdict(model.config),
        label_names=model.label_names,
        provenance=provenance or {},
        metrics=metrics or {},
        vidgen_version=__version__,
        weights_sha256=hashlib.sha256(weights).hexdigest(),
        parameters=sum(v.numel() for v in model.parameters()),
        render=RenderCapabilities(modes=tuple(model.render_modes), num_classes=int(getattr(model, "num_classes", 0) or 0),
                                  scale=int(getattr(model, "render_scale", 1) or 1),
                                  frame_size=getattr(model.config, "frame_size", None) if "generate" in
                                  model.render_modes else None),
    )
    storage.write_bytes(storage.join(uri, WEIGHTS), weights, content_type="application/octet-stream")
    storage.write_bytes(storage.join(uri, MANIFEST), manifest.to_json(), content_type="application/json")
    return manifest


def read_manifest(uri: str) -> ModelManifest:
    """The model.json of a saved model, checked for format and family."""
    return ModelManifest.read(uri, FAMILIES)


def load(uri: str, device: str | torch.device = "cpu") -> nn.Module:
    """The model saved at `uri`, in eval mode, on `device`. Reads safetensors and json only."""
    from vidgen import storage

    manifest = read_manifest(uri)
    cls = family_class(manifest.family)
    try:
        config = config_from_dict(cls.Config, manifest.config)
    except (TypeError, ValueError) as e:
        raise InputError(f"{storage.join(uri, MANIFEST)}: bad config: {e}") from None
    model = cls(config)
    model.preset = manifest.preset
    model.manifest = manifest  # what was loaded: a server compares its digest with the one a job planned with
    _set_label_names(model, manifest.label_names)

    weights = storage.read_bytes(storage.join(uri, WEIGHTS))
    digest = hashlib.sha256(weights).hexdigest()
    if manifest.weights_sha256 not in (None, digest):
        raise InputError(f"{storage.join(uri, WEIGHTS)}: sha256 {digest} does not match model.json's "
                         f"{manifest.weights_sha256} (a partial or mixed save?)")
    state = load_safetensors(weights)
    _check_state(model, state, uri)
    model.load_state_dict(state)
    return model.to(device).eval()


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], uri: str) -> None:
    """A ValueError naming the first tensor whose presence or shape disagrees with the config."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    where = f"{uri}: the weights do not match the config in model.json"
    if missing:
        raise InputError(f"{where}: missing tensor(s) {missing[:5]}")
    if unexpected:
        raise InputError(f"{where}: unexpected tensor(s) {unexpected[:5]}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise InputError(f"{where}: {key} has shape {tuple(state[key].shape)} in the weights but "
                             f"{tuple(tensor.shape)} from the config {dataclasses.asdict(model.config)}")
