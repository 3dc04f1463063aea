"""Checkpoint layout, saving and restoring DeepSpeed state, and consolidation for export.

A checkpoint is a folder that Ray Train merges from every rank's files and uploads under RUN/:

    <part>/ds/...                   DeepSpeed's own files per part ("model", or "generator" and
                                    "discriminator"): model states, each rank's ZeRO partitions
    vidgen_state.json               step, data position, world size, ZeRO stage, config (rank 0)
    extra.safetensors               family state outside the trained parts: the GAN's EMA
                                    generator, the style image (rank 0)
    rng-rank<R>.safetensors         each rank's torch RNG state

Consolidation (`consolidated_state_dict`) rebuilds the whole family `state_dict` from any ZeRO
stage, stage-3 partitions included, with DeepSpeed's own `zero_to_fp32`.
"""

from __future__ import annotations

import contextlib
import io

import json
import os

import torch
from safetensors.torch import load_file, save_file

TAG = "ds"
STATE = "vidgen_state.json"
EXTRA = "extra.safetensors"


def part_prefixes(model: torch.nn.Module) -> dict[str, str]:
    """part name -> its prefix in `model.state_dict()` (e.g. "generator" -> "generator.")."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for part, module in model.parts().items():
        name = names.get(id(module))
        if name is None:
            raise ValueError(f"part {part!r} is not a submodule of {type(model).__name__}")
        out[part] = f"{name}." if name else ""
    return out


def extra_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The family state outside its trained parts (EMA weights, style image, counters)."""
    prefixes = tuple(part_prefixes(model).values())
    if "" in prefixes:  # one part is the whole model: nothing lies outside it
        return {}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(prefixes)}


def save(directory: str, engines: dict, model: torch.nn.Module, state: dict, rank: int) -> None:
    """Every rank: its DeepSpeed files and RNG state; rank 0 also the vidgen state and extras."""
    for part, engine in engines.items():
        engine.save_checkpoint(os.path.join(directory, part), tag=TAG)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # GAN noise on a GPU comes from here
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, os.path.join(directory, f"rng-rank{rank}.safetensors"))
    if rank == 0:
        extras = extra_state(model)
        if extras:
            save_file(extras, os.path.join(directory, EXTRA))
        with open(os.path.join(directory, STATE), "w") as f:
            json.dump(state, f, indent=2)


def restore(directory: str, engines: dict, model: torch.nn.Module, rank: int) -> dict:
    """Load DeepSpeed state, extras and this rank's RNG; returns the saved vidgen state."""
    with open(os.path.join(directory, STATE)) as f:
        state = json.load(f)
    for part, engine in engines.items():
        path, _ = engine.load_checkpoint(os.path.join(directory, part), tag=TAG)
        if path is None:
            raise RuntimeError(f"checkpoint {directory} has no DeepSpeed state for part {part!r}")
    if os.path.exists(os.path.join(directory, EXTRA)):
        model.load_state_dict(load_file(os.path.join(directory, EXTRA)), strict=False)
    rng = os.path.join(directory, f"rng-rank{rank}.safetensors")
    if os.path.exists(rng):
        saved = load_file(rng)
        torch.set_rng_state(saved["torch"])
        if "cuda" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["cuda"])
    return state


@contextlib.contextmanager
def weights_only_loads():
    """Inside, every `torch.load` (ours, and DeepSpeed's zero_to_fp32, which asks for
    weights_only=False) unpickles only tensors, containers and the few plain record types
    DeepSpeed's checkpoint files hold: a checkpoint in a run folder that someone else could write
    cannot run code on the host that reads it (pickle.UnpicklingError instead)."""
    from unittest import mock

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    real = torch.load

    def load(*args, **kwargs):
        return real(*args, **{**kwargs, "weights_only": True})

    records = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]  # all that zero 0-3, fp32/bf16 write
    with torch.serialization.safe_globals(records), mock.patch.object(torch, "load", load):
        yield


@contextlib.contextmanager
def _no_progress_bars(module):
    """While inside, `module.tqdm(iterable, ...)` is the iterable itself: DeepSpeed's consolidation
    drew "Loading checkpoint shards" bars of a few milliseconds on the console, one per part exported."""
    from unittest import mock

    with mock.patch.object(module, "tqdm", lambda iterable, *args, **kwargs: iterable):
        yield


def consolidated_state_dict(directory: str, model: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full fp32 family state_dict from a checkpoint folder of any ZeRO stage, read without
    unpickling anything but tensors and DeepSpeed's records (`weights_only_loads`)."""
    full = {k: v.clone() for k, v in model.state_dict().items()}
    for part, prefix in part_prefixes(model).items():
        part_dir = os.path.join(directory, part)
        if zero_stage == 0:  # rank 0 wrote the whole module
            with weights_only_loads():
                states = torch.load(os.path.join(part_dir, TAG, "mp_rank_00_model_states.pt"), map_location="cpu")
            weights = states["module"]
        else:
            from deepspeed.utils import zero_to_fp32

            # it prints each file and tensor count it reads, and draws a progress bar or two on stderr
            with weights_only_loads(), contextlib.redirect_stdout(io.StringIO()), _no_progress_bars(zero_to_fp32):
                weights = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(part_dir, tag=TAG)
        for k, v in weights.items():
            key = prefix + k
            if key not in full:
                raise ValueError(f"checkpoint tensor {key!r} is not in the {type(model).__name__} model")
            if full[key].shape != v.shape:
                raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(v.shape)}, model has {tuple(full[key].shape)}")
            full[key] = v.to(full[key].dtype)
    extra = os.path.join(directory, EXTRA)
    if os.path.exists(extra):
        full.update(load_file(extra))
    return full
