"""`vidgen plan`: sizing a cluster for a daily load, checked against the autoscaler's bounds."""

from __future__ import annotations

import os

import pytest
import yaml

from vidgen import capacity, cli

REPO = os.path.join(os.path.dirname(__file__), "..")


def plan_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_load_within_the_shipped_cluster_fits(capsys):
    code, out, _ = plan_cli(capsys, "--render-minutes", "600", "--size", "1280x720", "--hours", "8",
                            "--train-clips-per-s", "5", "--cluster", f"{REPO}/cluster/kuberay/raycluster.yaml",
                            "--serve", f"{REPO}/serve/config.yaml")
    assert code == 0, out
    assert "cpu-encode 8 x 8 CPU" in out and "gpu 8 x 8 CPU + 1 GPU = 128 CPUs, 8 GPUs" in out
    assert out.count("fits (") == 3


def test_the_work_scales_with_minutes_pixels_and_the_window():
    load = capacity.Load(render_minutes=20000, width=640, height=360, hours=10)
    figures = capacity.shipped_figures(load)

    def cores(**change) -> float:
        rows = capacity.plan(capacity.Load(**{**vars(load), **change}), figures, capacity.Bounds())
        return float(next(figure for what, figure, _ in rows if what == "cores to render it").split()[0])

    base = cores()
    assert cores(render_minutes=40000) == pytest.approx(2 * base, rel=0.02)
    assert cores(hours=5) == pytest.approx(2 * base, rel=0.02)
    assert 2 * base < cores(width=1280, height=720) < 4.2 * base  # 4x the pixels; per-video costs stay


def test_a_load_beyond_the_bounds_exits_1_naming_the_bound(capsys, tmp_path):
    small = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "spec": {"workerGroupSpecs": [
        {"groupName": "cpu", "maxReplicas": 2, "template": {"spec": {"containers": [
            {"name": "w", "resources": {"limits": {"cpu": "4000m"}}}]}}}]}}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(small))
    code, out, _ = plan_cli(capsys, "--render-minutes", "100000", "--hours", "1", "--cluster", str(path))
    assert code == 1 and "EXCEEDS the bound" in out and "of 8 cores" not in out and "> 8 cores" in out


@pytest.mark.parametrize("argv, needle", [
    (["--size", "1280by720"], "--size '1280by720'"),
    (["--hours", "0"], "--hours 0"),
    (["--preset", "placebo"], "no encode figure for h264 placebo"),
    (["--cluster", "/nonexistent/cluster.yaml"], "/nonexistent/cluster.yaml"),
    (["--mode", "restore", "--calibrate"], "a gan model does not restore"),
    (["--model", "restore/huge", "--mode", "restore", "--calibrate"], "--model restore/huge"),
    (["--model", "nope/tiny", "--calibrate"], "--model nope/tiny: unknown model family 'nope'"),
])
def test_bad_input_is_one_line_naming_the_value(capsys, argv, needle):
    code, _, err = plan_cli(capsys, "--render-minutes", "10", *argv)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_calibrate_measures_encode_and_inference_here():
    load = capacity.Load(render_minutes=10, width=320, height=180, preset="ultrafast")
    figures = capacity.calibrate(load, frames=16)
    assert 0 < figures.encode_s_per_mpixel < 1 and 0 < figures.infer_s_per_frame < 1
    assert figures.measured and "320x180" in figures.measured[0]


def test_the_serve_bound_is_servings_default_or_a_models_own(tmp_path):
    path = tmp_path / "serve.yaml"
    config = {"applications": [{"import_path": "vidgen.serving:app_builder", "args": {"models": {"g": "s3://b/g"}}}]}
    path.write_text(yaml.safe_dump(config))
    assert capacity.read_bounds(None, str(path)).serve_model_replicas == 2  # serving.settings.Autoscaling's default
    config["applications"][0]["args"]["models"]["r"] = {"uri": "s3://b/r", "autoscaling": {"max_replicas": 6}}
    path.write_text(yaml.safe_dump(config))
    assert capacity.read_bounds(None, str(path)).serve_model_replicas == 6
