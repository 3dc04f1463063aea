"""What every model family shares with the trainer: `TrainStep`, `Batch`, and config presets.

The contract itself is described in `vidgen/models/__init__.py`. This file holds the few pieces
that all five families use, so that each family file stays self-contained otherwise.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import Tensor

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
