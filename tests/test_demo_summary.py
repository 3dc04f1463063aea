"""The demo's summary as a typed record: what `vidgen demo` prints and writes when a stage did not run."""

from __future__ import annotations

import json

from vidgen import demo
from vidgen.quality import Figure


def test_a_summary_with_stages_missing_still_prints_writes_and_round_trips(tmp_path):
    """A demo stopped after training the GAN: the rest keep their defaults (no KeyError in the
    console summary or the gallery), summary.json reads back equal, and failures of both batches
    are what `vidgen demo` exits 1 on."""
    run = demo.Demo(str(tmp_path), minutes=1.0)
    run.summary.gan = demo.RunFigures(steps=40, seconds=12.5, clips_per_s=30.0, g_loss=0.7)
    run.summary.gan.label_accuracy = {"samples": 0.95, "chance": 0.333}  # added by the measuring stage
    run.summary.figures = [Figure("ads: GAN samples showing the asked shape", 0.95, "chance", 1 / 3, target=0.9).row()]
    run.stage_seconds["train a class-conditional GAN"] = 20.0
    run.summary.stage_seconds = run.stage_seconds

    text = demo.format_summary(run)
    assert "GAN: 40 steps at 30.0 clips/s; restore: 0 steps" in text and "meets the target (>= 0.9)" in text
    demo.write_gallery(run)
    assert "ads: GAN samples showing the asked shape" in (tmp_path / "index.html").read_text()

    written = json.loads(json.dumps(run.summary.model_dump(mode="json")))
    assert written["gan"]["label_accuracy"]["samples"] == 0.95 and written["ads"]["items"] == 0
    assert demo.DemoSummary.model_validate(written) == run.summary
    assert run.summary.failed == []
    run.summary.ads.failed, run.summary.education.failed = ["ad-2"], ["lesson-1"]
    assert run.summary.failed == ["ad-2", "lesson-1"]
