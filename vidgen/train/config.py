"""The typed training config: one home for every default; YAML file, flags and `--set` overrides.

    vidgen train jobs/train/gan-tiny.yaml --max-steps 30 --set model.hidden=64

Every field is a flag (`--zero-stage 3` for `zero_stage`); `--set key=value` reaches anything,
including the family's model config (`--set model.z_content=32`). Unknown keys and bad values
fail before Ray starts, with the key named.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from vidgen import storage
from vidgen.errors import InputError


class ConfigError(InputError):
    """A training config that cannot run; the message names the key."""


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    family: str = Field(description="model family (a name in vidgen.models.FAMILIES)")
    preset: Literal["tiny", "small", "base"] = Field("tiny", description="model size preset")
    model: dict[str, Any] = Field(default_factory=dict, description="overrides of the family's model config")
    data: str = Field(description="dataset URI (a `vidgen data` dataset)")
    run: str = Field(description="run URI: checkpoints, config.yaml, metrics.jsonl, samples/")
    split: str = Field("train", description="dataset split to train on")
    val_split: str = Field("val", description="split for validation metrics at checkpoints ('' = none)")
    workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks)")
    gpu: bool = Field(False, description="one GPU per worker")
    threads_per_worker: int = Field(1, ge=1, description="torch intra-op threads per worker (CPU)")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="training precision")
    micro_batch: int = Field(4, ge=1, description="clips per worker per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float | None = Field(None, gt=0, description="learning rate (default: the family's)")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field("constant", description="decay after warmup")
    warmup_steps: int = Field(0, ge=0)
    max_steps: int = Field(100, ge=1, description="optimizer steps to train in total")
    max_minutes: float | None = Field(None, gt=0, description="stop (with a checkpoint) when this much time has passed")
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept")
    sample_every: int = Field(0, ge=0, description="steps between sample videos (0 = at checkpoints)")
    log_every: int = Field(1, ge=1, description="steps between metrics.jsonl lines")
    max_failures: int = Field(0, ge=0, description="worker failures survived by restarting from a checkpoint")
    seed: int = Field(0, description="seed of model init, noise and data order")
    eval_batches: int = Field(4, ge=0, description="validation micro-batches evaluated at each checkpoint")
    style_image: str | None = Field(None, description="style family: the style image (PNG/JPEG URI)")
    stage3_param_persistence_threshold: int = Field(0, ge=0, description="ZeRO-3: params this small stay whole")
    probe_out: str | None = Field(None, description="at the end, write the live model's output on its family's "
                                                    "fixed probe input here (safetensors 'output'): what its export "
                                                    "must reproduce (vidgen.train.loop.probe_output)")

    @field_validator("family")
    @classmethod
    def _family(cls, v: str) -> str:
        from vidgen import models

        if v not in models.FAMILIES:  # worded as pydantic words a Literal's error
            *names, last = [repr(name) for name in models.FAMILIES]
            raise PydanticCustomError("literal_error", "Input should be {expected}",
                                      {"expected": f"{', '.join(names)} or {last}" if names else last})
        return v

    @field_validator("data", "run", "style_image", "probe_out")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:
            return storage.normalize(v)  # local paths absolute before they reach Ray workers
        except storage.StorageError as e:
            raise ValueError(str(e)) from None

    @model_validator(mode="after")
    def _checks(self) -> TrainConfig:
        from vidgen import models

        if models.FAMILIES[self.family].needs_style_image and not self.style_image:
            raise ValueError(f"style_image is required for the {self.family} family (an image URI)")
        return self

    def model_overrides(self) -> dict[str, Any]:
        return dict(self.model)


# Fields that define the model and its sharding: a resumed run must keep them.
RESUME_FIXED = ("family", "preset", "model", "workers", "zero_stage", "data")


def parse_set(items: list[str]) -> dict[str, Any]:
    """`["a=1", "model.x=[1,2]"]` -> nested dict, values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | None, flags: dict[str, Any], sets: list[str]) -> TrainConfig:
    """YAML file (optional) < flags < --set; errors name the key."""
    data: dict[str, Any] = {}
    if path:
        try:
            data = yaml.safe_load(storage.read_text(path)) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys")
    data = _merge(data, {k: v for k, v in flags.items() if v is not None})
    data = _merge(data, parse_set(sets))
    return validate(data, source=path or "flags")


def validate(data: dict[str, Any], source: str = "config") -> TrainConfig:
    try:
        cfg = TrainConfig(**data)
    except ValidationError as e:
        errors = e.errors()
        # An unknown key explains the rest (a misspelt required key is also "missing"): name it first.
        err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
        key = ".".join(str(p) for p in err["loc"]) or "config"
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        raise ConfigError(f"{source}: {key}{shown}: {err['msg']}") from None
    _check_model_overrides(cfg)
    return cfg


def _check_model_overrides(cfg: TrainConfig) -> None:
    from vidgen import models

    try:
        models.family_class(cfg.family).Config.preset(cfg.preset, **cfg.model)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)


def check_resume(old: dict[str, Any], new: TrainConfig) -> None:
    """Refuse to resume a run whose model or sharding the new config changes, naming the field."""
    for key in RESUME_FIXED:
        before, after = old.get(key), getattr(new, key)
        if key == "data" and before and storage.normalize(before) == after:
            continue
        if before != after:
            raise ConfigError(
                f"run {new.run} was trained with {key}={before!r}; this config has {key}={after!r}. "
                f"Resume with the same {key}, or use a new --run"
            )
