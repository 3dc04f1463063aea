"""Render batches of generated, restored, stylized and predicted videos into object storage.

    from vidgen.render import load_batch, render_batch
    batch = load_batch("jobs/batches/ads.yaml")          # validated whole; SpecError names the field
    result = render_batch(batch, workers=2)              # Ray: model workers + encode/upload tasks
    print(result.summary())

`spec` holds the spec models and limits, `engine` the per-item inference/encode/record functions
(the serving path calls `engine.render_items`), `batch` the Ray pipeline, `gallery` the index page.
"""

from vidgen.render.spec import (
    MAX_FPS,
    MAX_ITEMS,
    MAX_RENDITIONS,
    MAX_SECONDS,
    MAX_SIDE,
    RenderBatch,
    RenderItem,
    Rendition,
    ResolvedItem,
    SpecError,
    load_batch,
    parse_batch,
)

__all__ = ["MAX_FPS", "MAX_ITEMS", "MAX_RENDITIONS", "MAX_SECONDS", "MAX_SIDE", "BatchResult", "RenderBatch",
           "RenderItem", "Rendition", "ResolvedItem", "SpecError", "load_batch", "parse_batch", "plan_batch",
           "render_batch", "render_items"]


def __getattr__(name: str):
    # The engine and the pipeline import torch; the spec alone stays light (validation, --dry-run parsing).
    if name in ("render_batch", "plan_batch", "BatchResult"):
        from vidgen.render import batch

        return getattr(batch, name)
    if name == "render_items":
        from vidgen.render import engine

        return engine.render_items
    raise AttributeError(f"module 'vidgen.render' has no attribute {name!r}")
