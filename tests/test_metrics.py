"""Metrics against values computed by hand (or by a direct, loop-free formula in numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vidgen.metrics import life_rule_accuracy, life_step, psnr, ssim


def test_psnr_of_a_known_mse():
    a = torch.zeros(2, 3, 4, 8, 8)
    b = a.clone()
    b[0] += 0.1                                                   # MSE 0.01 -> 10 log10(4 / 0.01)
    b[1] -= 0.2                                                   # MSE 0.04 -> 20 dB
    per_video = psnr(a, b, reduction="none")
    assert per_video.tolist() == pytest.approx([10 * math.log10(400), 20.0], abs=1e-4)
    assert psnr(a, b).item() == pytest.approx((10 * math.log10(400) + 20.0) / 2, abs=1e-4)
    assert psnr(a, b, data_range=1.0)[()].item() == pytest.approx(psnr(a, b).item() - 20 * math.log10(2), abs=1e-4)
    assert math.isinf(psnr(a, a).item())
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, b[:, :, :2])


def test_pooled_psnr_is_one_figure_from_the_mse_of_all_videos_and_stays_finite_with_an_exact_one():
    a = torch.zeros(3, 3, 4, 8, 8)
    b = a.clone()
    b[0] += 0.1                                                   # MSE 0.01
    b[1] -= 0.2                                                   # MSE 0.04; b[2] is exact
    assert psnr(a, b, reduction="pooled").item() == pytest.approx(10 * math.log10(4 / (0.05 / 3)), abs=1e-4)
    assert math.isinf(psnr(a, b).item())                          # the mean of per-video figures is not


def test_ssim_of_identical_videos_is_one():
    video = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    assert ssim(video, video).item() == pytest.approx(1.0, abs=1e-6)
    noise = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    assert abs(ssim(video, noise).item()) < 0.1                  # independent noise: no structure shared


def test_ssim_of_constant_frames_by_hand():
    # sigma = 0 everywhere: SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1), C1 = (0.01 * 2)^2 = 0.0004
    a = torch.full((1, 1, 1, 11, 11), 0.5)
    b = torch.full((1, 1, 1, 11, 11), -0.5)
    assert ssim(a, b).item() == pytest.approx((-0.5 + 0.0004) / (0.5 + 0.0004), abs=1e-6)
    c = torch.full((1, 1, 1, 11, 11), 0.25)
    assert ssim(a, c).item() == pytest.approx((0.25 + 0.0004) / (0.3125 + 0.0004), abs=1e-6)


def _ssim_one_window(x: np.ndarray, y: np.ndarray, data_range: float = 2.0) -> float:
    """SSIM of two 11x11 patches, straight from Wang et al.'s definition, in float64."""
    taps = np.arange(11) - 5.0
    g = np.exp(-(taps**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
    cov = (w * (x - mx) * (y - my)).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def test_ssim_matches_the_definition_window_by_window():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (12, 13))
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1)
    # a 12x13 frame has 2 x 3 valid window positions; SSIM is their mean
    expected = np.mean([_ssim_one_window(x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11])
                        for i in range(2) for j in range(3)])
    got = ssim(torch.tensor(x).view(1, 1, 1, 12, 13), torch.tensor(y).view(1, 1, 1, 12, 13))
    assert got.item() == pytest.approx(expected, abs=1e-5)
    # channels and frames are averaged: a second, identical frame pair pulls the mean to (s + 1) / 2
    two = torch.stack([torch.tensor(x), torch.tensor(x)]).view(1, 1, 2, 12, 13)
    other = torch.stack([torch.tensor(y), torch.tensor(x)]).view(1, 1, 2, 12, 13)
    assert ssim(two, other).item() == pytest.approx((expected + 1) / 2, abs=1e-5)


def test_ssim_rejects_frames_smaller_than_the_window():
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.zeros(1, 1, 1, 8, 8), torch.zeros(1, 1, 1, 8, 8))


def grid(rows: list[str]) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in rows])


def test_life_step_by_hand():
    blinker = grid([".....", "..#..", "..#..", "..#..", "....."])
    assert (life_step(blinker) == grid([".....", ".....", ".###.", ".....", "....."])).all()
    block = grid(["....", ".##.", ".##.", "...."])
    assert (life_step(block) == block).all()
    # dead boundary: a blinker on the top edge loses the half that would lie outside the grid
    edge = grid([".###.", ".....", ".....", "....."])
    assert (life_step(edge) == grid(["..#..", "..#..", ".....", "....."])).all()


def test_life_rule_accuracy_by_hand():
    t0 = grid([".....", "..#..", "..#..", "..#..", "....."])
    t1 = grid([".....", ".....", ".###.", ".....", "....."])
    frames = np.stack([t0, t1])                                  # (T, H, W): a blinker, two periods
    assert life_rule_accuracy(frames, np.stack([t1, t0])) == 1.0
    wrong = t1.copy()
    wrong[0, 0] = True                                           # one cell of 25 breaks the rule
    wrong[2, 2] = False                                          # and a second
    assert life_rule_accuracy(t0, wrong) == pytest.approx(23 / 25)
    assert life_rule_accuracy(frames.astype(np.uint8), np.stack([wrong, t0]).astype(np.uint8)) == \
        pytest.approx(48 / 50)
    assert life_rule_accuracy(torch.tensor(t0), torch.tensor(t1)) == 1.0
    with pytest.raises(ValueError, match="binary"):
        life_rule_accuracy(t0 * 2, t1)
    with pytest.raises(ValueError, match="same shape"):
        life_rule_accuracy(t0, t1[:4])


def test_frechet_distance_of_gaussians():
    from vidgen.quality import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g)
    b = torch.randn(4000, 3, generator=g)
    assert frechet_distance(a, b) < 0.02                                   # same distribution
    assert frechet_distance(a, b + torch.tensor([2.0, 0, 0])) == pytest.approx(4.0, abs=0.1)  # mean shift^2
    assert frechet_distance(a, 3 * b) == pytest.approx(3 * (3 - 1) ** 2, abs=0.3)  # scale: tr(1 + 9 - 2*3) per dim


def test_figure_prints_its_baseline_and_a_verdict():
    from vidgen.quality import Figure

    low = Figure("label accuracy", 0.23, "chance", 1 / 3, target=0.9)
    assert not low.met and not low.better
    assert low.line() == ("label accuracy: 0.230 vs chance 0.333: MISSES the target (>= 0.9); "
                          "no better than chance")
    tie = Figure("label accuracy", float(torch.tensor(50 / 150)), "chance", 1 / 3)  # a float32 share of 150
    assert not tie.better and tie.verdict() == "no better than chance"
    ratio = Figure("frechet ratio", 2.5, "real vs real", 1.0, unit="x", target=3.0, higher_is_better=False)
    assert ratio.met and ratio.row()["verdict"].startswith("meets the target (<= 3x)")


def test_conditional_scores_ask_one_sample_per_train_clip_so_both_frechet_distances_have_equal_n():
    """A Frechet distance from n clips is biased upwards by about tr(cov)/n. Samples fewer than the
    train clips (150 against 288, as the scoring used to ask) made the ratio's two distances unequal."""
    import numpy as np

    from vidgen.data.synth import synth_clip
    from vidgen.data.tensors import frames_to_video
    from vidgen.quality import score_conditional

    def clips(n: int, seed: int):
        rows = [synth_clip("shapes", seed, i, 8, 32, 0.0) for i in range(n)]
        return frames_to_video(np.stack([r.frames for r in rows])), torch.tensor([r.label for r in rows])

    train, held_out, judged = clips(60, seed=0), clips(60, seed=1), clips(60, seed=2)
    asked: list[list[int]] = []

    def copy_of_train(labels, seed):  # a generator that reproduces the train clips exactly
        asked.append(labels)
        return train[0]

    scores = score_conditional(copy_of_train, train, held_out, classes=3, judge_clips=judged, more_draws=[], judges=2)
    assert asked == [train[1].tolist()]
    assert scores.frechet_ratio == pytest.approx(1.0, abs=1e-4)  # the train clips themselves: exactly the baseline
    assert scores.frechet_range == pytest.approx((1.0, 1.0), abs=1e-4)

    # More draws: the samples of draw k are asked for its real set's labels with seed + k, and a
    # generator that reproduces each draw's real clips still scores exactly the baseline.
    draws = [(clips(60, seed=3), clips(60, seed=4)), (clips(60, seed=5), clips(60, seed=6))]
    reals = [train, *(real for real, _ in draws)]
    calls: list[tuple[list[int], int]] = []

    def copy_of_each(labels, seed):
        calls.append((labels, seed))
        return reals[seed - 123][0]

    scores = score_conditional(copy_of_each, train, held_out, classes=3, judge_clips=judged, more_draws=draws,
                               judges=2)
    assert calls == [(real[1].tolist(), 123 + k) for k, real in enumerate(reals)]
    assert scores.frechet_ratio == pytest.approx(1.0, abs=1e-4)


def test_scoring_a_generator_runs_each_judge_once_over_each_clip(monkeypatch):
    """The label accuracies read the features the Frechet distances were measured on: each judge
    used to run again over every sample and held-out clip for them, 40% of the demo's scoring."""
    from vidgen import quality
    from vidgen.data.synth import synth_clip
    from vidgen.data.tensors import frames_to_video

    def clips(n: int, seed: int):
        rows = [synth_clip("shapes", seed, i, 4, 32, 0.0) for i in range(n)]
        return frames_to_video(np.stack([r.frames for r in rows])), torch.tensor([r.label for r in rows])

    train, held_out, judged = clips(48, seed=0), clips(48, seed=1), clips(48, seed=2)
    draws = [(clips(48, seed=3), clips(48, seed=4))]
    reals = [train, *(real for real, _ in draws)]
    flipped = [torch.flip(real[0], dims=[-2]) for real in reals]  # the samples: real clips upside down
    passes = []
    features = quality.ClipClassifier.features

    def counted(self, video):  # the passes of scoring (training the judges runs with gradients)
        passes.extend([] if torch.is_grad_enabled() else [len(video)])
        return features(self, video)

    monkeypatch.setattr(quality.ClipClassifier, "features", counted)
    scores = quality.score_conditional(lambda labels, seed: flipped[seed - 123], train, held_out, classes=3,
                                       judge_clips=judged, more_draws=draws, judges=2)
    # per judge and draw: the held-out clips, the samples, the real clips; nothing more
    assert passes == [48] * (2 * 2 * 3), passes
    monkeypatch.setattr(quality.ClipClassifier, "features", features)
    panel = quality.JudgePanel(*judged, classes=3, judges=2)
    asked, held = torch.cat([r[1] for r in reals]), [held_out, *(h for _, h in draws)]
    assert scores.label_accuracy == pytest.approx(panel.label_accuracy(torch.cat(flipped), asked), abs=1e-6)
    assert scores.judge_on_real == pytest.approx(
        panel.label_accuracy(torch.cat([h[0] for h in held]), torch.cat([h[1] for h in held])), abs=1e-6)
    with pytest.raises(ValueError, match="47 labels for 48 clips"):  # never broadcast against the clips
        panel.score(flipped[0], train[0], held_out[0], train[1][:47], held_out[1])


def test_a_judge_panel_gives_one_ratio_per_judge_and_their_geometric_mean():
    """One judge's Frechet ratio is one draw of its seed (blurred real clips read 11-89x over ten
    judges): the panel trains each judge from its own seed, and the score is their geometric mean."""
    import numpy as np

    from vidgen.data.synth import synth_clip
    from vidgen.data.tensors import frames_to_video
    from vidgen.quality import JudgePanel, frechet_distance, geometric_mean, score_conditional
    from vidgen.models.restore import _gaussian_blur

    def clips(n: int, seed: int):
        rows = [synth_clip("shapes", seed, i, 4, 32, 0.0) for i in range(n)]
        return frames_to_video(np.stack([r.frames for r in rows])), torch.tensor([r.label for r in rows])

    train, held_out, judged = clips(60, seed=0), clips(60, seed=1), clips(60, seed=2)
    blurred = torch.stack([_gaussian_blur(clip, 1.0) for clip in train[0]])
    panel = JudgePanel(*judged, classes=3, judges=3)
    ratios = panel.frechet_ratios(blurred, train[0], held_out[0])
    assert len(ratios) == 3 and geometric_mean(ratios) > 1.5  # the panel sees the blur
    assert max(ratios) / min(ratios) > 1.1, ratios           # judges of different seeds see it differently
    assert geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
    scores = score_conditional(lambda labels, seed: blurred, train, held_out, classes=3, judge_clips=judged,
                               more_draws=[], judges=3)
    assert scores.frechet_ratio == pytest.approx(geometric_mean(ratios), rel=1e-6)
    assert scores.frechet_range == pytest.approx((min(ratios), max(ratios)), rel=1e-6)
    # over two draws each of the ratio's distances is the mean of the draws' distances (not the
    # mean of the draws' ratios), and the second draw moves it
    real2, held2 = clips(60, seed=3)[0], clips(60, seed=4)[0]
    blurred2 = torch.stack([_gaussian_blur(clip, 1.0) for clip in real2])
    two = panel.frechet_ratios([blurred, blurred2], [train[0], real2], [held_out[0], held2])
    for judge, ratio in zip(panel.judges, two, strict=True):
        def fd(a, b, judge=judge):
            return frechet_distance(judge.features(a), judge.features(b))
        fake = (fd(blurred, held_out[0]) + fd(blurred2, held2)) / 2
        base = (fd(train[0], held_out[0]) + fd(real2, held2)) / 2
        assert ratio == pytest.approx(fake / base, rel=1e-6)
    assert all(abs(a / b - 1) > 1e-3 for a, b in zip(two, ratios)), (two, ratios)
