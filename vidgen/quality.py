"""Held-out quality scores, each beside a baseline measured in the same run, with a plain verdict.

    clf = train_classifier(train_videos, train_labels)          # a judge trained on real clips
    label_accuracy(clf, samples, asked_labels)                   # share of samples shown the asked class
    frechet_distance(clf.features(a), clf.features(b))           # FID-style, in the judge's feature space
    panel = JudgePanel(judge_videos, judge_labels, classes=3)    # JUDGES judges from different seeds
    panel.frechet_ratios(samples, real_train, held_out)          # one ratio per judge; geometric_mean
    panel.score(samples, real_train, held_out, asked, held_out_labels)  # ConditionalScores, in one pass
    Figure("label accuracy", 0.93, "chance", 1 / 3, target=0.9).line()

Used by `vidgen demo` and `bench/quality.py`. Plain torch; videos are (B, C, T, H, W) in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ClipClassifier(nn.Module):
    """A small frame classifier, logits averaged over a clip's frames: the judge of conditional samples.

    `features` (the pooled 64-d frame features averaged over time) is the space of the Frechet distance.
    """

    def __init__(self, classes: int, channels: int = 3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 16, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(64, classes)

    def features(self, video: Tensor) -> Tensor:  # (B, C, T, H, W) -> (B, 64)
        b, c, t, h, w = video.shape
        return self.body(video.transpose(1, 2).reshape(b * t, c, h, w)).view(b, t, -1).mean(1)

    def forward(self, video: Tensor) -> Tensor:   # (B, C, T, H, W) -> (B, classes)
        return self.head(self.features(video))


def train_classifier(videos: Tensor, labels: Tensor, classes: int, steps: int = 300, seed: int = 0,
                     frames: int = 2) -> ClipClassifier:
    """A ClipClassifier trained on real clips (with small shifts, so it judges shape, not place), on
    the videos' device. Each step shows it `frames` random frames of each clip (0: all of them): it
    classifies frames, and two a clip train it as well as eight in a quarter of the time."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = ClipClassifier(classes, videos.shape[1]).to(videos.device)
    opt = torch.optim.Adam(clf.parameters(), 3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(videos), (32,), generator=generator).to(videos.device)
        shift = [int(s) for s in torch.randint(-2, 3, (2,), generator=generator)]
        batch = videos[idx]
        if frames:
            batch = batch[:, :, torch.randint(0, batch.shape[2], (frames,), generator=generator).to(videos.device)]
        batch = torch.roll(batch, shifts=shift, dims=(3, 4))
        loss = F.cross_entropy(clf(batch), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clf.eval()


@torch.no_grad()
def label_accuracy(clf: ClipClassifier, videos: Tensor, labels: Tensor) -> float:
    """Share of `videos` that `clf` assigns to their `labels`."""
    return float((clf(videos).argmax(1) == labels).float().mean())


@torch.no_grad()
def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D) (Heusel et al. 2017)."""
    a, b = a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr sqrt(A B) = sum sqrt(eig(A^1/2 B A^1/2)); both are PSD, so symmetric eigensolvers suffice
    w, v = np.linalg.eigh(cov_a)
    half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(half @ cov_b @ half), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


# Judges in a panel. One judge's feature space is one draw: on the GAN's real clips, the ratio of
# blurred clips (sigma 1 px) ranged 11-89x over ten judge seeds, that of clips still in time 1.5-8x
# (one object colour for all: 11-19x), so one judge's Frechet ratio says as much about its seed as
# about the samples. The geometric mean over 8 judges spreads about sqrt(8) times less (2026-12-01).
JUDGES = 8
# Draws of real clips. The Frechet distance between two sets of 384 real clips is itself one draw:
# over 28 pairs of fresh sets it ranged 0.08-0.78 (the judges' geometric mean; their features are
# heavy-tailed), so a ratio over one pair moved 4x with the clips alone (one GAN read 37x against the
# demo's pair and 8.9x against bench/quality.py's). The mean over 6 pairs brought both to 8-9x.
REAL_DRAWS = 6


def fresh_clips(kind: str, seed: int, count: int, frames: int, size: int) -> tuple[Tensor, Tensor]:
    """`count` real clips of a procedural kind (vidgen.data.synth), drawn anew from `seed`:
    (videos (N, C, T, H, W) in [-1, 1], labels (N,))."""
    from vidgen.data.synth import synth_clip
    from vidgen.data.tensors import frames_to_video

    clips = [synth_clip(kind, seed, i, frames, size, 0.0) for i in range(count)]
    return frames_to_video(np.stack([c.frames for c in clips])), torch.tensor([c.label for c in clips])


def fresh_draws(kind: str, first_seed: int, real: int, held_out: int, frames: int, size: int) -> list:
    """REAL_DRAWS - 1 pairs (real clips, held-out clips) of fresh clips for `score_conditional`'s
    `more_draws`, beside the data's own pair: pair i draws `real` clips from seed first_seed + 2i
    and `held_out` clips from first_seed + 2i + 1."""
    return [(fresh_clips(kind, first_seed + 2 * i, real, frames, size),
             fresh_clips(kind, first_seed + 2 * i + 1, held_out, frames, size)) for i in range(REAL_DRAWS - 1)]


JUDGE_SEED, DRAW_SEED = 20_000, 30_000  # fresh clips for scoring a generator; the datasets' seeds are small


def scoring_clips(kind: str, real: int, held_out: int, frames: int, size: int, judges: int = 384,
                  judge_seed: int = JUDGE_SEED, draw_seed: int = DRAW_SEED) -> tuple[tuple, list]:
    """Fresh clips of `kind`, none of them in a dataset, for `score_conditional`: `judges` clips for
    the judges to train on, and REAL_DRAWS - 1 (real, held-out) draws beside the data's own pair,
    each real set `real` clips and each held-out set `held_out` (as large as the data's two sets)."""
    return (fresh_clips(kind, judge_seed, judges, frames, size),
            fresh_draws(kind, draw_seed, real, held_out, frames, size))


class JudgePanel:
    """`judges` ClipClassifiers trained on the same real clips from seeds 0, 1, ...: their mean label
    accuracy, and one Frechet ratio each (`geometric_mean` combines them)."""

    def __init__(self, videos: Tensor, labels: Tensor, classes: int, judges: int = JUDGES):
        self.judges = [train_classifier(videos, labels, classes, seed=seed) for seed in range(judges)]

    @torch.no_grad()
    def label_accuracy(self, videos: Tensor, labels: Tensor) -> float:
        return float(np.mean([label_accuracy(judge, videos, labels) for judge in self.judges]))

    @torch.no_grad()
    def frechet_ratios(self, samples, reference, held_out) -> list[float]:
        """Per judge: the Frechet distance samples vs held-out over reference (real clips) vs
        held-out. Each argument is a video batch or a list of them, one per draw (samples[k] and
        reference[k] are both scored against held_out[k]): then each distance is the mean over the
        draws, so that neither rests on one draw of clips."""
        return [judged.ratio for judged in self._judge_each(samples, reference, held_out)]

    @torch.no_grad()
    def score(self, samples, reference, held_out, sample_labels, held_out_labels) -> ConditionalScores:
        """`frechet_ratios` combined, and the label accuracy of the samples and of the held-out clips (as
        `label_accuracy` on each set's draws put together), from one pass of each judge over each
        clip: the accuracies read the features the distances were measured on. The labels come as
        the videos do, one tensor per draw."""
        ratios, on_samples, on_held_out = [], [], []
        for judged in self._judge_each(samples, reference, held_out):
            ratios.append(judged.ratio)
            on_samples.append(_accuracy_of_features(judged.judge, judged.sample_features, _draws(sample_labels)))
            on_held_out.append(_accuracy_of_features(judged.judge, judged.held_out_features, _draws(held_out_labels)))
        return ConditionalScores(float(np.mean(on_samples)), float(np.mean(on_held_out)), geometric_mean(ratios),
                                 (min(ratios), max(ratios)))

    def _judge_each(self, samples, reference, held_out) -> Iterator[_Judged]:
        samples, reference, held_out = _draws(samples), _draws(reference), _draws(held_out)
        for judge in self.judges:
            held = [judge.features(h) for h in held_out]
            fake = [judge.features(x) for x in samples]
            fake_fd = np.mean([frechet_distance(f, h) for f, h in zip(fake, held, strict=True)])
            base_fd = np.mean([frechet_distance(judge.features(x), h) for x, h in zip(reference, held, strict=True)])
            yield _Judged(judge, float(fake_fd / base_fd), fake, held)


class _Judged(NamedTuple):
    """One judge's Frechet ratio, and the features (one tensor per draw) it was measured on."""

    judge: ClipClassifier
    ratio: float
    sample_features: list[Tensor]
    held_out_features: list[Tensor]


def _accuracy_of_features(judge: ClipClassifier, features: list[Tensor], labels: list[Tensor]) -> float:
    """`label_accuracy` of the clips whose features (one tensor per draw) are given."""
    features, labels = torch.cat(features), torch.cat(labels)
    if len(features) != len(labels):
        raise ValueError(f"{len(labels)} labels for {len(features)} clips")
    logits = judge.head(features)
    return float((logits.argmax(1) == labels.to(logits.device)).float().mean())


def _draws(videos) -> list[Tensor]:
    return [videos] if isinstance(videos, Tensor) else list(videos)


def geometric_mean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values))))


@dataclass
class ConditionalScores:
    """How well a class-conditional generator's samples match real held-out clips."""

    label_accuracy: float   # share of samples a judge assigns to the asked class (the panel's mean)
    judge_on_real: float    # the judges' accuracy on the real held-out clips (their own ceiling)
    frechet_ratio: float    # Frechet distance samples vs held-out, over real (train) vs held-out, each
                            # the mean over the draws: the geometric mean of the panel's judges
    frechet_range: tuple[float, float]  # the lowest and the highest judge's ratio


@torch.no_grad()
def score_conditional(sample, train: tuple[Tensor, Tensor], held_out: tuple[Tensor, Tensor], classes: int, *,
                      judge_clips: tuple[Tensor, Tensor], more_draws: list, seed: int = 123,
                      judges: int = JUDGES) -> ConditionalScores:
    """Train a panel of judges on `judge_clips` (real clips that neither distance uses), then score
    `sample(labels, seed) -> videos` against the held-out clips. Videos are (N, C, T, H, W) in
    [-1, 1]; labels (N,) long.

    A judge's features on the clips it was trained on are not those of clips it never saw, which
    puts the real-vs-real baseline on unequal terms with the samples (whom no judge saw): the judges
    get a third set (`scoring_clips` draws one).

    `more_draws`: further ((real videos, labels), (held-out videos, labels)) pairs of fresh real
    clips, each real set as large as train (see REAL_DRAWS; [] scores over the data's pair alone,
    which is one draw). For each draw k (train and held_out first), samples asked for its real
    set's labels (seed + k) and its real set are scored against its held-out set; each distance is
    the mean over the draws.

    The samples are asked for the real clips' labels, one each, so both Frechet distances (samples
    vs held-out, real vs held-out) are measured with the same number of clips and the same mix
    of classes: a Frechet distance estimated from n clips is biased upwards by about tr(cov)/n, and
    fewer samples than train clips made a perfect generator score above 1."""
    draws = [(train, held_out), *more_draws]
    with torch.enable_grad():
        panel = JudgePanel(*judge_clips, classes, judges)
    samples, asked = [], []
    for k, ((_, y), _) in enumerate(draws):
        samples.append(sample(y.tolist(), seed + k))
        asked.append(y.to(samples[-1].device))
    return panel.score(samples, [x for (x, _), _ in draws], [h for _, (h, _) in draws], asked,
                       [hy for _, (_, hy) in draws])


@dataclass
class Figure:
    """One measured figure beside its baseline: `line()` prints it with a verdict.

    `target` is what the figure must reach (>= for higher_is_better, else <=); without one the
    verdict only compares the figure with its baseline.
    """

    name: str
    value: float
    baseline_name: str
    baseline: float
    unit: str = ""
    target: float | None = None
    higher_is_better: bool = True
    target_text: str = ""

    @property
    def better(self) -> bool:
        """Better by more than rounding: a float32 share equal to chance is not better than chance."""
        margin = 1e-6 * max(1.0, abs(self.baseline))
        return self.value > self.baseline + margin if self.higher_is_better else self.value < self.baseline - margin

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def verdict(self) -> str:
        side = "better than" if self.better else "no better than"
        if self.met is None:
            return f"{side} {self.baseline_name}"
        goal = self.target_text or f"{'>=' if self.higher_is_better else '<='} {self.target:g}{self.unit}"
        return f"{'meets' if self.met else 'MISSES'} the target ({goal}); {side} {self.baseline_name}"

    def row(self) -> dict:
        return {"figure": self.name, "value": round(self.value, 4), "baseline": self.baseline_name,
                "baseline_value": round(self.baseline, 4), "unit": self.unit, "target": self.target,
                "met": self.met, "verdict": self.verdict()}

    def line(self) -> str:
        return (f"{self.name}: {self.value:.3f}{self.unit} vs {self.baseline_name} {self.baseline:.3f}{self.unit}: "
                f"{self.verdict()}")


def table(figures: list[dict], width: int = 52) -> str:
    """Rows from `Figure.row()` as a fixed-width text table."""
    lines = [f"  {'figure':{width}s} {'value':>9s}  {'baseline':>24s}  verdict"]
    for f in figures:
        base = f"{f['baseline']} {f['baseline_value']:g}{f['unit']}"
        value = f"{f['value']:.3f}{f['unit']}"
        lines.append(f"  {f['figure'][:width]:{width}s} {value:>9s}  {base[:24]:>24s}  {f['verdict']}")
    return "\n".join(lines)
