"""The family contract (`Family`): what vidgen's trainer, evaluation, export and render engine ask
of a model family, plus the pieces every family uses (`TrainStep`, `Batch`, config presets).

`vidgen/models/__init__.py` describes the training half in prose; `Family` below types all of it.
The trainer, evaluation, export and the render engine never name a family: they ask it.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Mapping, Protocol

from torch import Tensor, nn

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

# {"video": (B, C, T, H, W) float in [-1, 1], "label": (B,) long, optional}
Batch = dict[str, Tensor]

# loss_fn(batch, modules) -> (loss, scalars); `modules` maps part names to callables (a DeepSpeed
# engine for the part being stepped, plain modules for the others): a loss only calls them.
LossFn = Callable[[Batch, Mapping[str, Callable[..., Any]]], tuple[Tensor, dict[str, float]]]


@dataclass(frozen=True)
class TrainStep:
    """One optimiser step of one trainable part: `loss(batch, modules)` is backpropagated into `part`."""

    part: str
    loss: LossFn


EVAL_SEED = 1234  # degradations at evaluation are the same at every checkpoint


class Family(Protocol):
    """A model family: an `nn.Module` holding all its parts. Each family file implements this.

    Training (vidgen.train):
    - `name`: the family's name in configs and model.json; `Config`: its config dataclass, with
      `Config.preset(name, **overrides)`; `config`, `label_names`, `preset` on each instance.
    - `parts()`, `optimizer_settings(part)`, `train_steps()`, `after_step(part)`: see
      `vidgen/models/__init__.py`; a family with one trained part inherits them from
      `OnePartFamily` and writes only its `_loss`. `after_step_gathers`: parts whose `after_step` reads their
      weights (under ZeRO-3 the trainer gathers them for it); empty when the hook is a no-op.
    - `conditional`: trained on the dataset's labels (the trainer sets `num_classes` from them and
      saves their names); `needs_style_image`: the config's `style_image` is required and handed to
      `set_style_image` before training.
    - `val_metrics(video, index, life_cell)`: reference metrics of one validation batch
      (B, C, T, H, W) (the trainer prefixes `val_` and averages); `{}` when there are none.
      `index` numbers the batch (seeds for degradations); `life_cell` is the Game-of-Life cell
      size of the dataset, or None.
    - `preview(video, seed, num_frames)`: a uint8 grid video (T, H, W, 3) of what the model does
      now; `video` is a validation batch, or None when `preview_needs_input` is False.
    - `probe(x)`: the model's output for a fixed input `x` (1, C, T, H, W), or from its seed when
      it takes no input: export compares a live model with its export through it.

    Rendering (vidgen.render), per mode in `render_modes` (of generate, restore, stylize, predict):
    - generate: `sample_chunks(seeds, num_frames, labels, chunk_frames)` and `num_classes` (labels
      an item may ask for; 0: unconditional); `config.frame_size`, the side it samples, is saved in
      the manifest (`render.frame_size`) so that a batch is planned and limited without torch.
    - restore, stylize: `transform(video)` -> (B, C, T, H * render_scale, W * render_scale); an
      output frame reads the input frames within `render_radius`; input sides are cut down to a
      multiple of `input_multiple`.
    - predict: `predict_chunks(context, num_frames, chunk_frames)` after `context_frames` real
      frames; input sides are cut down to a multiple of `input_multiple`.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    render_modes: ClassVar[tuple[str, ...]]
    conditional: ClassVar[bool]
    needs_style_image: ClassVar[bool]
    preview_needs_input: ClassVar[bool]
    after_step_gathers: ClassVar[frozenset[str]]
    config: Any
    label_names: list[str] | None
    preset: str | None

    def parts(self) -> dict[str, nn.Module]: ...
    def optimizer_settings(self, part: str) -> dict: ...
    def train_steps(self) -> list[TrainStep]: ...
    def after_step(self, part: str) -> None: ...
    def val_metrics(self, video: Tensor, index: int, life_cell: int | None) -> dict[str, float]: ...
    def preview(self, video: Tensor | None, seed: int, num_frames: int | None) -> np.ndarray: ...
    def probe(self, x: Tensor) -> Tensor: ...


class Presets:
    """A family config's `preset(name, **overrides)`: the fields its module's PRESETS names
    ("tiny", "small", "base"), with overrides; a ValueError names an unknown preset or field."""

    @classmethod
    def preset(cls, name: str, **overrides):
        return config_from_preset(cls, sys.modules[cls.__module__].PRESETS, name, overrides)


@dataclass
class OnePartConfig(Presets):
    """The optimizer fields of a `OnePartFamily`'s config: AdamW's lr, betas and weight decay. A family
    config derives from it and redeclares a field whose default differs (`lr: float = 1e-3`)."""

    lr: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0


class OnePartFamily(nn.Module):
    """The training contract of a family with one trained part, `net` (trained as "model"): one
    optimizer step a batch on `_loss`, with the config's lr, betas and weight decay, and nothing after
    it. A subclass sets `name`, `Config`, `Net` (the part's module class, built from the config),
    `render_modes` and what differs, and writes `_loss`."""

    Net: type[nn.Module]
    conditional = False
    needs_style_image = False
    preview_needs_input = True
    after_step_gathers: frozenset[str] = frozenset()

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.label_names: list[str] | None = None
        self.preset: str | None = None
        self.net = self.Net(config)

    def parts(self) -> dict[str, nn.Module]:
        return {"model": self.net}

    def optimizer_settings(self, part: str) -> dict:
        if part != "model":
            raise ValueError(f"unknown {type(self).__name__} part {part!r}; expected 'model'")
        cfg = self.config
        return {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "weight_decay": cfg.weight_decay}

    def train_steps(self) -> list[TrainStep]:
        return [TrainStep("model", self._loss)]

    def after_step(self, part: str) -> None:
        pass

    def _loss(self, batch: Batch, modules) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError


class Generates(Family, Protocol):
    """A family that serves the generate mode."""

    @property
    def num_classes(self) -> int: ...
    def sample_chunks(self, seeds: list[int], num_frames: int | None = None, labels=None,
                      chunk_frames: int = 64) -> Iterator[Tensor]: ...


class Transforms(Family, Protocol):
    """A family that serves the restore or stylize mode."""

    @property
    def render_scale(self) -> int: ...
    @property
    def render_radius(self) -> int: ...
    @property
    def input_multiple(self) -> int: ...
    def transform(self, video: Tensor) -> Tensor: ...


class Predicts(Family, Protocol):
    """A family that serves the predict mode."""

    @property
    def context_frames(self) -> int: ...
    @property
    def input_multiple(self) -> int: ...
    def predict_chunks(self, context: Tensor, num_frames: int, chunk_frames: int = 64) -> Iterator[Tensor]: ...


def optimizer_step(model, optimizers: Mapping[str, Any], batch: Batch, autocast: str | None = None,
                   clip: float = 1.0) -> dict[str, float]:
    """One step of each of the family's TrainSteps, in order, the way vidgen.train.loop runs them but
    in this process, without DeepSpeed: the other parts frozen during a part's backward, gradients
    clipped at `clip`, then `after_step`. `optimizers`: part -> torch optimizer. `autocast`: a device
    type whose bf16 autocast the losses run under. Returns the steps' scalars."""
    import contextlib

    import torch

    parts, scalars = model.parts(), {}
    for step in model.train_steps():
        others = [m for p, m in parts.items() if p != step.part]
        for m in others:
            m.requires_grad_(False)
        with torch.autocast(autocast, dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            loss, values = step.loss(batch, parts)
        optimizers[step.part].zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parts[step.part].parameters(), clip)
        optimizers[step.part].step()
        for m in others:
            m.requires_grad_(True)
        model.after_step(step.part)
        scalars |= values
    return scalars


def config_from_preset(cls: type, presets: Mapping[str, Mapping[str, Any]], name: str,
                       overrides: Mapping[str, Any]):
    """`cls(**presets[name], **overrides)`, with a ValueError naming an unknown preset or key."""
    if name not in presets:
        raise ValueError(f"unknown {cls.__name__} preset {name!r}; expected one of {sorted(presets)}")
    return config_from_dict(cls, {**presets[name], **overrides})


def config_from_dict(cls: type, data: Mapping[str, Any]):
    """Build the config dataclass `cls` from plain values (e.g. parsed JSON or YAML).

    Unknown keys and values of the wrong type raise a ValueError naming the field. JSON lists
    become tuples for tuple fields; ints are accepted for float fields. Missing keys take the
    dataclass default, so a model saved before a field was added still loads.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(fields)}")
    values = {key: _check_type(cls, key, hints[key], value) for key, value in data.items()}
    return cls(**values)


def _check_type(cls: type, key: str, hint: Any, value: Any) -> Any:
    """`value` converted to the field's type (int -> float, list -> tuple), or a ValueError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(o for o in options if o is not type(None))
        origin = typing.get_origin(hint)
    if origin is tuple:
        item_type = typing.get_args(hint)[0]
        if isinstance(value, (list, tuple)):
            return tuple(_check_type(cls, key, item_type, v) for v in value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, hint):
        return value
    raise ValueError(f"{cls.__name__}.{key} must be {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)


def require(condition: bool, message: str) -> None:
    """Raise ValueError(message) unless `condition`: for config `__post_init__` checks."""
    if not condition:
        raise ValueError(message)
