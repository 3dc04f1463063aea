"""The benchmarks' contenders still run against the code they measure: bench/render.py's Ray Data
pipeline broke silently when `engine.encode_item` began returning a typed record (it JSON-encoded
the record as a dict), and no test ran it."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from vidgen import metrics, models

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_render_bench_ray_data_contender_renders_every_item(tmp_path, ray_session, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import render as render_bench

    torch.manual_seed(0)
    model_uri = str(tmp_path / "gan")
    models.save(models.build("gan", "tiny", num_classes=3, label_names=render_bench.LABELS), model_uri)
    args = argparse.Namespace(items=3, title=True, fps=8, seconds=0.5, size=32, crf=23, x264_preset="ultrafast",
                              cpus=1, workers=None)
    out = tmp_path / "out"
    render_bench.ours_ray_data(args, model_uri, str(out))  # asserts the batch rendered all 3
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["id"], r["status"]) for r in records] == [(f"ad-{i:03d}", "ok") for i in range(3)]
    assert all((out / f"ad-{i:03d}.mp4").stat().st_size > 0 for i in range(3))


def test_a_partial_quality_run_keeps_each_kept_familys_machine(tmp_path, monkeypatch):
    """`bench/run_all.py --only quality --args='--only vae'` relabelled every kept family's row with
    the machine of the new run; each family now keeps the machine it ran on."""
    monkeypatch.syspath_prepend(str(BENCH))
    import run_all
    from families import kept_families

    figure = {"figure": "gan: x", "value": 1.0, "baseline": "chance", "baseline_value": 0.5, "unit": "", "met": None}
    old = tmp_path / "quality.json"
    old.write_text(json.dumps({"families": {"gan": {"figures": [figure]}}, "_machine": "machine A"}))
    families = kept_families(str(old)) | {"vae": {"figures": [figure], "_machine": "machine B"}}
    rows = run_all._quality({"families": families, "_machine": "machine B"})
    assert [(row[0].split(",")[0], row[2]) for row in rows] == [("quality: gan", "machine A"),
                                                                ("quality: vae", "machine B")]


def test_a_filter_is_tuned_by_its_distance_to_clean_clips_even_where_one_comes_back_exact(monkeypatch):
    """bench/quality.py's denoise row chose nlmeans' weakest strength (s=1): a tuning clip whose noise
    was drawn near 0 came back from the filter exactly clean (rounded to 8 bits), its PSNR was +inf,
    so was every strength's mean, and max() took the first. That baseline scored 33.5 dB on the
    scored clips; tuned by their pooled PSNR, nlmeans (s=8) scores 39.4 dB there, and the model's
    margin over the best filter is +1.6 dB, not the +6.9 dB reported before."""
    monkeypatch.syspath_prepend(str(BENCH))
    import quality as quality_bench

    g = torch.Generator().manual_seed(0)
    flat = (torch.rand(3, 3, 1, 1, 1, generator=g) * 255).round() / 127.5 - 1  # 8-bit values, as clips have
    clean = flat.expand(3, 3, 4, 16, 16).contiguous()  # one colour each: what a denoiser restores
    noisy = clean + torch.randn(clean.shape, generator=g) * torch.tensor([0.1, 0.1, 0.0]).view(3, 1, 1, 1, 1)
    best, scores = quality_bench.tune_filter(noisy, clean, ["null", "hqdn3d=8:6:12:9"])
    assert all(math.isfinite(v) for v in scores.values()), scores
    assert best == "hqdn3d=8:6:12:9", scores  # not the no-op
    assert scores["null"] == pytest.approx(metrics.psnr(noisy.clamp(-1, 1), clean, reduction="pooled").item(), abs=0.1)


def test_quality_bench_overrides_reach_only_the_family_they_name(monkeypatch):
    """`bench/quality.py --set gan.ema_decay=0.99` A/B-tests a recipe through the real trainer: the
    value is parsed as JSON (or kept as text), reaches the gan run only, a setting that names no
    bench stops the run with a one-line error naming it, and the README row of a run with overrides
    names them."""
    monkeypatch.syspath_prepend(str(BENCH))
    import quality as quality_bench

    overrides = quality_bench.model_overrides(["gan.ema_decay=0.99", "gan.diffaugment=translation,brightness",
                                               "restore.levels=2"])
    assert overrides["gan"] == {"ema_decay": 0.99, "diffaugment": "translation,brightness"}
    assert overrides["restore"] == {"levels": 2}
    assert overrides["vae"] == {} and set(overrides) == set(quality_bench.BENCHES)
    for bad in ("gans.ema_decay=0.99", "gan.ema_decay", "ema_decay=0.99"):
        with pytest.raises(SystemExit, match=f"--set '{bad}': expected BENCH.KEY=VALUE"):
            quality_bench.model_overrides([bad])
    import run_all

    figure = {"figure": "gan: x", "value": 1.0, "baseline": "chance", "baseline_value": 0.5, "unit": "", "met": None}
    rows = run_all._quality({"families": {"gan": {"figures": [figure], "set": overrides["gan"]},
                                          "vae": {"figures": [figure]}}})
    assert "with ema_decay=0.99, diffaugment=translation,brightness (quality.py --set)" in rows[0][0]
    assert "--set" not in rows[1][0]
