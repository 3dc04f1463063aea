"""Count the model-state bytes a rank actually holds: parameters, gradients, optimizer state.

On CPU in fp32, RSS says little about ZeRO sharding (NOTES-stack.md), so this walks the tensors a
rank keeps alive through its DeepSpeed engines — module parameters (or, under ZeRO-3, their
partitions), gradients and ZeRO's gradient partitions, the client optimizer's state, ZeRO's fp32
master partitions and flat parameter buffers — and sums the distinct storages they live in.
A tensor is counted once however many views point at it.
"""

from __future__ import annotations

import torch

KINDS = ("params", "grads", "optimizer")


def _kind_of(name: str) -> str:
    name = name.lower()
    if "grad" in name:
        return "grads"
    if "fp32" in name or "single_partition" in name or "master" in name:
        return "optimizer"
    return "params"


def _tensors(obj, name: str, depth: int = 0):
    """(name, tensor) pairs inside tensors, lists, tuples and dicts, a few levels deep."""
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif depth < 3 and isinstance(obj, list | tuple):
        for x in obj:
            yield from _tensors(x, name, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for k, x in obj.items():
            yield from _tensors(x, f"{name}.{k}" if isinstance(k, str) else name, depth + 1)


def held_bytes(engines: dict) -> dict[str, int]:
    """{"params", "grads", "optimizer", "total"}: bytes of distinct storages this rank holds."""
    seen: set[int] = set()
    out = dict.fromkeys(KINDS, 0)

    def add(kind: str, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            return
        seen.add(storage.data_ptr())
        out[kind] += storage.nbytes()

    for engine in engines.values():
        for p in engine.module.parameters():
            add("params", getattr(p, "ds_tensor", None) if hasattr(p, "ds_tensor") else p.data)
            if p.grad is not None:
                add("grads", p.grad)
        opt = engine.optimizer
        if opt is None:
            continue
        inner = getattr(opt, "optimizer", opt)  # ZeRO wraps the client optimizer
        for state in inner.state.values():
            for _, t in _tensors(state, "state"):
                add("optimizer", t)
        if inner is not opt:
            for attr, value in vars(opt).items():
                for name, t in _tensors(value, attr):
                    add(_kind_of(name), t)
    out["total"] = sum(out[k] for k in KINDS)
    return out
