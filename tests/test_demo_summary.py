"""The demo's summary as a typed record: what `vidgen demo` prints and writes when a stage did not run."""

from __future__ import annotations

import hashlib
import json

import torch

from vidgen import demo
from vidgen.data.format import open_dataset
from vidgen.quality import Figure


def test_a_summary_with_stages_missing_still_prints_writes_and_round_trips(tmp_path):
    """A demo stopped after training the GAN: the rest keep their defaults (no KeyError in the
    console summary or the gallery), summary.json reads back equal, and failures of both batches
    are what `vidgen demo` exits 1 on."""
    run = demo.Demo(str(tmp_path), minutes=1.0)
    run.summary.gan = demo.RunFigures(steps=40, seconds=12.5, clips_per_s=30.0, g_loss=0.7)
    run.summary.gan.label_accuracy = {"samples": 0.95, "chance": 0.333}  # added by the measuring stage
    run.summary.figures = [Figure("ads: GAN samples showing the asked shape", 0.95, "chance", 1 / 3, target=0.9).row()]
    stage = "train a class-conditional GAN, ZeRO-2 on 2 workers (5.1 min of steps)"  # as the demo names it
    run.stage_seconds[stage] = 20.0
    run.summary.stage_seconds = run.stage_seconds

    text = demo.format_summary(run)
    assert "GAN: 40 steps at 30.0 clips/s; restore: 0 steps" in text and "meets the target (>= 0.9)" in text
    assert f"  {stage}  " in text  # whole, not cut at a fixed width
    demo.write_gallery(run)
    assert "ads: GAN samples showing the asked shape" in (tmp_path / "index.html").read_text()

    written = json.loads(json.dumps(run.summary.model_dump(mode="json")))
    assert written["gan"]["label_accuracy"]["samples"] == 0.95 and written["ads"]["items"] == 0
    assert demo.DemoSummary.model_validate(written) == run.summary
    assert run.summary.failed == []
    run.summary.ads.failed, run.summary.education.failed = ["ad-2"], ["lesson-1"]
    assert run.summary.failed == ["ad-2", "lesson-1"]


def test_the_gan_is_scored_against_hundreds_of_fresh_held_out_clips_not_the_datasets_few(tmp_path, monkeypatch):
    """The demo's Frechet ratio came from the dataset's ~40 val clips: a distance estimated from n
    clips is biased up by about tr(cov) / n, which swamps the real-vs-real baseline and pulls the
    ratio towards 1 (a lenient verdict). It now scores against HELD_OUT_CLIPS fresh clips of the same
    generator, none of them a dataset clip. Its judges are a panel (one judge's ratio is as much its
    seed's as the samples') trained on a third fresh set, so the real train clips, like the samples,
    are clips no judge has seen; and both distances are means over several draws of real clips (one
    draw's real-vs-real distance ranged 10x, and so did the ratio with it)."""
    from vidgen import models, quality

    torch.manual_seed(0)
    run = demo.Demo(str(tmp_path), minutes=1.0)
    demo.make_datasets(run)
    ds = open_dataset(run.uri("data", "shapes32"))
    models.save(models.build("gan", "tiny", num_classes=3, label_names=ds.labels), run.uri("models", "gan"))
    seen = {}

    # Which clips the demo scores with is checked here; the scoring itself, in tests/test_metrics.py
    # (8 judges over 6 draws of 384 clips took 90 s of this test).
    def spy(sample, train, held_out, classes, **kw):
        seen["train"], seen["held_out"], seen["judge_clips"] = train, held_out, kw.get("judge_clips")
        seen["more_draws"] = kw.get("more_draws", [])
        return quality.ConditionalScores(0.5, 0.9, 4.25, (3.5, 5.3))

    monkeypatch.setattr(quality, "score_conditional", spy)
    figures = demo.measure_gan(run)["figures"]
    assert len(seen["held_out"][0]) >= 384  # the dataset holds ~40 val clips
    assert sorted(set(seen["held_out"][1].tolist())) == [0, 1, 2]
    judged = seen["judge_clips"]
    assert len(judged[0]) >= 384 and sorted(set(judged[1].tolist())) == [0, 1, 2]
    # more draws of real and held-out clips, each real set as large as train
    assert len(seen["more_draws"]) == quality.REAL_DRAWS - 1 >= 3
    assert all(len(real) == len(seen["train"][0]) for (real, _), _ in seen["more_draws"])
    # no clip is in two of the sets (the dataset's, the held-out, the judges', the draws'), nor twice in one

    def digests(videos) -> list[bytes]:
        frames = ((videos.permute(0, 2, 3, 4, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        return [hashlib.sha1(clip.tobytes()).digest() for clip in frames]

    dataset = [hashlib.sha1(r["frames"].tobytes()).digest() for r in ds.iter_clips()]
    sets = [seen["held_out"][0], judged[0], *(v for draw in seen["more_draws"] for (v, _) in draw)]
    everything = dataset + [d for videos in sets for d in digests(videos)]
    assert len(set(everything)) == len(everything)
    assert set(digests(seen["train"][0])) <= set(dataset)  # the hashes see a clip as the dataset stores it
    assert figures[2].baseline_name == "real vs held-out" and figures[2].value == 4.25
    assert f"({quality.JUDGES} judges: 3.5-5.3x)" in figures[2].name and quality.JUDGES >= 4
