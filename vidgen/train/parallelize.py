"""How a model's parts become DeepSpeed engines: the DeepSpeed config, one engine per trainable part
with its optimizer and LR schedule, mixed precision at a part's boundary, and gathering ZeRO-3
parameters. The training loop (vidgen.train.loop) calls these and knows nothing else of DeepSpeed.
"""

from __future__ import annotations

import contextlib

import torch

from vidgen.train.config import TrainConfig


def deepspeed_config(cfg: TrainConfig) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": cfg.zero_stage},
        # A torch AdamW is passed in: DeepSpeed's FusedAdam would JIT-compile on CPU (NOTES-stack).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.zero_stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = cfg.stage3_param_persistence_threshold
    if cfg.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return config


def lr_lambda(cfg: TrainConfig):
    import math

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        done = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - done)
        return 1.0

    return factor


def build_engines(cfg: TrainConfig, model) -> dict:
    """One DeepSpeed engine per trainable part, each with a torch AdamW and an LR schedule."""
    skip_deepspeed_jit_ops()
    import deepspeed

    engines = {}
    for part, module in model.parts().items():
        settings = dict(model.optimizer_settings(part))
        if cfg.lr is not None:
            settings["lr"] = cfg.lr
        optimizer = torch.optim.AdamW(module.parameters(), **settings)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=schedule, config=deepspeed_config(cfg)
        )
        engines[part] = engine
        if cfg.precision != "fp32":
            dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
            # DeepSpeed casts a part's parameters, not its buffers: spectral norm's power-iteration
            # vectors would stay float32 beside bf16 weights, and torch.mv refuses mixed dtypes.
            for buffer in module.buffers():
                if buffer.is_floating_point():
                    buffer.data = buffer.data.to(dtype)
            cast_at_boundary(module, dtype)
    return engines


def cast_at_boundary(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Let a part whose weights DeepSpeed made bf16/fp16 take and give float32 tensors.

    Batches, noise and labels come in float32 from the data and the family's losses; DeepSpeed
    casts the part's weights but not its inputs. Floating inputs are cast to `dtype` on the way in
    and floating outputs back to float32 on the way out, whether the part is called through its
    engine or as the plain frozen module (the GAN's D in the G step), so losses compute in float32.
    """

    def cast(x, to):
        return x.to(to) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    def inputs(_, args, kwargs):
        return tuple(cast(a, dtype) for a in args), {k: cast(v, dtype) for k, v in kwargs.items()}

    def outputs(_, args, out):
        return tuple(cast(o, torch.float32) for o in out) if isinstance(out, tuple) else cast(out, torch.float32)

    module.register_forward_pre_hook(inputs, with_kwargs=True)
    module.register_forward_hook(outputs)


def skip_deepspeed_jit_ops() -> None:
    """Keep `deepspeed.initialize` from JIT-compiling its shared-memory all-reduce op on CPU.

    That op (deepspeed_shm_comm) only speeds up inference all-reduce on CPU, and building it costs
    35-50 s per machine. DeepSpeed keeps its compatible-ops table in one module dict on purpose so
    that edits persist (see deepspeed/ops/__init__.py); marking the op incompatible makes
    `build_shm_op` return None and comm falls back to torch.distributed (gloo), as on any platform
    without the op.
    """
    if torch.cuda.is_available():
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@contextlib.contextmanager
def gathered(engines: dict, parts: list[str] | None = None):
    """Whole parameters of the given parts while inside (ZeRO-3 gathers them; others: no-op).

    A collective under ZeRO-3: every rank must enter it.
    """
    params = [p for name, e in engines.items() if parts is None or name in parts for p in e.module.parameters()]
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def lr_of(engines: dict) -> float:
    engine = next(iter(engines.values()))
    return float(engine.optimizer.param_groups[0]["lr"]) if engine.optimizer else 0.0
