"""The family contract: a sixth family defined here alone trains, exports and renders through
vidgen's real trainer, exporter and render engine, which never name a family."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidgen import media, models, storage
from vidgen.data import synth
from vidgen.models.contract import Batch, TrainStep, config_from_preset

pytestmark = pytest.mark.slow


@dataclass
class InvertConfig:
    channels: int = 3
    lr: float = 0.05

    @classmethod
    def preset(cls, name: str, **overrides) -> InvertConfig:
        return config_from_preset(cls, {"tiny": {}, "small": {}, "base": {}}, name, overrides)


class Inverter(nn.Module):
    """Toy family: a per-pixel colour map (a 1x1x1 conv, starting as the identity) trained to
    invert colours, x -> -x. Serves the stylize mode."""

    name = "invert"
    Config = InvertConfig
    render_modes = ("stylize",)
    conditional = False
    needs_style_image = False
    preview_needs_input = True
    after_step_gathers: frozenset[str] = frozenset()

    def __init__(self, config: InvertConfig):
        super().__init__()
        self.config, self.label_names, self.preset = config, None, None
        self.net = nn.Conv3d(config.channels, config.channels, 1)
        with torch.no_grad():
            self.net.weight.copy_(torch.eye(config.channels).view_as(self.net.weight))
            self.net.bias.zero_()

    def parts(self) -> dict[str, nn.Module]:
        return {"model": self.net}

    def optimizer_settings(self, part: str) -> dict:
        return {"lr": self.config.lr, "betas": (0.9, 0.99), "weight_decay": 0.0}

    def train_steps(self) -> list[TrainStep]:
        return [TrainStep("model", self._loss)]

    def _loss(self, batch: Batch, modules) -> tuple[Tensor, dict[str, float]]:
        video = batch["video"].float()
        loss = F.mse_loss(modules["model"](video).float(), -video)
        return loss, {"loss": loss.item()}

    def after_step(self, part: str) -> None:
        pass

    @torch.no_grad()
    def val_metrics(self, video: Tensor, index: int, life_cell: int | None) -> dict[str, float]:
        return {"inversion_mse": F.mse_loss(self.transform(video), -video).item()}

    @torch.no_grad()
    def preview(self, video: Tensor | None, seed: int = 0, num_frames: int | None = None):
        from vidgen.data.tensors import tile, video_to_frames

        pairs = zip(video, self.transform(video), strict=True)
        return tile([video_to_frames(v) for pair in pairs for v in pair], cols=2)

    def probe(self, x: Tensor) -> Tensor:
        return self.transform(x)

    # render (stylize): any size, one frame at a time
    render_scale, render_radius, input_multiple = 1, 0, 1

    @torch.no_grad()
    def transform(self, video: Tensor) -> Tensor:
        return self.net(video).clamp(-1, 1)


@pytest.fixture
def inverter():
    import ray.cloudpickle

    module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(module)  # Ray workers cannot import this test module
    models.register(Inverter)
    yield Inverter
    models.unregister(Inverter.name)
    ray.cloudpickle.unregister_pickle_by_value(module)


def test_a_family_defined_in_a_test_trains_exports_and_renders(inverter, tmp_path, ray_session):
    from vidgen.data.format import open_dataset
    from vidgen.data.tensors import frames_to_video
    from vidgen.render import parse_batch, render_batch
    from vidgen.train.config import ConfigError, validate
    from vidgen.train.export import export, probe_output
    from vidgen.train.trainer import read_metrics, train

    data = str(tmp_path / "shapes")
    synth.synthesize("shapes", 16, 8, 32, data, seed=0, val_fraction=0.25, progress=False)
    run, out = str(tmp_path / "run"), str(tmp_path / "model")
    base = {"family": "invert", "data": data, "run": run, "workers": 1, "zero_stage": 0, "micro_batch": 4,
            "max_steps": 12, "checkpoint_every": 12, "eval_batches": 1}
    with pytest.raises(ConfigError, match="family = 'nope'"):
        validate({**base, "family": "nope"})
    result = train(validate(base))
    rows = read_metrics(run)
    assert result.steps == 12 and [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]  # it learns to invert colours
    assert storage.exists(storage.join(run, "samples", "step-000012.mp4"))  # its preview

    manifest = export(run, out)
    assert manifest.family == "invert" and manifest.metrics["val_inversion_mse"] < rows[0]["loss"]
    exported = models.load(out)
    assert type(exported) is Inverter and models.family_of(exported) == "invert"
    held_out = frames_to_video(np.stack([row["frames"] for row in open_dataset(data).iter_clips("val")]))
    fresh = models.build("invert")  # the identity it started as
    assert F.mse_loss(exported.transform(held_out), -held_out) < 0.5 * F.mse_loss(fresh.transform(held_out), -held_out)
    assert probe_output(exported).shape == (1, 3, 8, 32, 32)

    frames = (np.random.default_rng(0).random((10, 32, 48, 3)) * 255).astype(np.uint8)
    clip = str(tmp_path / "clip.mp4")
    storage.write_bytes(clip, media.encode(frames, fps=10, preset="ultrafast"))
    spec = {"name": "invert", "output": str(tmp_path / "renders"), "model": out,
            "defaults": {"preset": "ultrafast"},
            "items": [{"id": "inverted", "mode": "stylize", "input": clip},
                      {"id": "wrong-mode", "mode": "generate", "seed": 1, "fps": 10, "seconds": 1}]}
    rendered = render_batch(parse_batch(spec), workers=0, progress=False)
    records = {r["id"]: r for r in rendered.records}
    assert records["inverted"]["status"] == "ok", records["inverted"]
    info = media.probe(storage.join(spec["output"], "inverted.mp4"))
    assert (info.width, info.height) == (48, 32) and len(media.decode(storage.join(spec["output"], "inverted.mp4"))) == 10
    assert "is a invert model; mode generate needs a gan or vae model" in records["wrong-mode"]["error"]

    # On Ray the model worker is another process, which cannot import this module's family by name
    on_ray = render_batch(parse_batch({**spec, "output": str(tmp_path / "on-ray")}), workers=1, progress=False)
    assert {r["id"]: r["status"] for r in on_ray.records} == {"inverted": "ok", "wrong-mode": "error"}, on_ray.records
    assert media.probe(storage.join(tmp_path / "on-ray", "inverted.mp4")).frames == 10


def test_the_render_specs_index_of_modes_is_the_families_own():
    """vidgen.manifest.MODE_FAMILIES answers without importing torch (the ingress, the planner); it must say
    what the families' `render_modes` say."""
    from vidgen.manifest import MODE_FAMILIES

    assert {m: set(f) for m, f in MODE_FAMILIES.items()} == {m: set(f) for m, f in models.mode_families().items()}
