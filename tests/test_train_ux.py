"""Watching a run, without Ray: the progress line, TensorBoard events in RUN/tb/, one line per print.

    pytest tests/test_train_ux.py         # in-process, a few seconds (plus moto's S3 server once)

The training loop calls these pieces on rank 0; here they run alone, against a local folder and
moto's S3 server (the `root` fixture), and the events are read back with TensorBoard's own reader.
"""

from __future__ import annotations

import builtins
import json
import logging
import math
import os
import sys
import warnings

import numpy as np
import pytest

from vidgen import storage
from vidgen.train.loop import MetricsLog, format_duration, progress_line, quiet_worker_logs, upscaled

# --------------------------------------------------------------------------------------------
# The progress line


def test_progress_line_rate_eta_and_losses():
    # 120 steps in 40 s: 3 steps/s; 280 steps left -> 93 s
    line = progress_line(120, 400, 120, 40.0, None, {"d_loss": 0.693147, "g_loss": 0.7})
    assert line == "step 120/400 (30%) 3 steps/s ETA 1m33s d_loss=0.6931 g_loss=0.7000"


def test_progress_line_after_resume_counts_only_this_sessions_steps():
    # resumed at step 100: 50 steps in 25 s is 2 steps/s (not 150 / 25); 50 left -> 25 s
    assert progress_line(150, 200, 50, 25.0, None, {}) == "step 150/200 (75%) 2 steps/s ETA 25s"


def test_progress_line_eta_is_the_time_budget_when_it_ends_first():
    # 0.2 steps/s would need 4950 s for 990 steps; the 2-minute budget has 70 s left
    assert progress_line(10, 1000, 10, 50.0, 2.0, {}) == (
        "step 10/1000 (41% of 2m00s) 0.2 steps/s ETA 1m10s (time budget)")
    # a budget that outlasts the steps changes nothing
    assert progress_line(10, 20, 10, 50.0, 60.0, {}) == "step 10/20 (50%) 0.2 steps/s ETA 50s"
    # the budget spent (the loop stops at this step): no negative ETA
    assert progress_line(30, 1000, 30, 130.0, 2.0, {}).endswith("ETA 0s (time budget)")
    assert progress_line(400, 400, 400, 100.0, None, {"loss": 1}) == "step 400/400 (100%) 4 steps/s ETA 0s loss=1.0000"


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.4, 59.6, 87, 3599, 3600, 7380)] == [
        "0s", "59s", "1m00s", "1m27s", "59m59s", "1h00m", "2h03m"
    ]
    assert format_duration(math.inf) == "?"
    assert progress_line(5, 10, 0, 0.0, None, {}) == "step 5/10 (50%) 0 steps/s ETA ?"


def test_sample_frames_are_upscaled_to_about_512_pixels():
    grid = np.arange(8 * 32 * 48 * 3, dtype=np.uint8).reshape(8, 32, 48, 3)
    big = upscaled(grid)
    assert big.shape == (8, 320, 480, 3)  # 512 // 48 = 10
    assert (big[3, 10:20, 20:30] == grid[3, 1, 2]).all()
    assert upscaled(np.zeros((2, 600, 600, 3), np.uint8)).shape == (2, 600, 600, 3)


# --------------------------------------------------------------------------------------------
# MetricsLog: metrics.jsonl and TensorBoard events in RUN/tb/


def _events(run: str):
    """TensorBoard's reader over RUN/tb (it reads s3:// itself, with boto3)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(storage.join(run, "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _values(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, pytest.approx(e.value)) for e in acc.Scalars(tag)]


def _rows(run: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]


def test_metrics_log_writes_tensorboard_events_readable_while_and_after_training(root, capsys):
    run = storage.join(root, "run")
    log = MetricsLog(run, rank=0, resume_step=0)
    log.step(1, 0, {"d_loss": 0.5, "g_loss": 1.5}, 0.25, 16.0, 1e-3)
    log.flush()  # mid-run: what `tensorboard --logdir RUN` sees while training goes on
    [name] = storage.list_prefix(storage.join(run, "tb"))
    assert "tfevents" in storage.basename(name)
    assert _values(_events(run), "train/d_loss") == [(1, 0.5)]

    log.step(2, 0, {"d_loss": 0.25, "g_loss": 1.25}, 0.2, 20.0, 5e-4)
    log.extra(2, {"val_psnr": 21.5, "val_ssim": 0.75})
    frame = np.zeros((64, 48, 3), np.uint8)
    frame[:, :24] = 255
    log.image("samples", 2, frame)
    log.close()

    acc = _events(run)
    tags = acc.Tags()
    assert set(tags["scalars"]) == {
        "train/epoch", "train/d_loss", "train/g_loss", "train/step_time_s", "train/clips_per_s", "train/lr",
        "train/rss_peak_mb", "val/psnr", "val/ssim",
    }
    assert _values(acc, "train/d_loss") == [(1, 0.5), (2, 0.25)]
    assert _values(acc, "train/g_loss") == [(1, 1.5), (2, 1.25)]
    assert _values(acc, "train/lr") == [(1, 1e-3), (2, 5e-4)]
    assert _values(acc, "train/clips_per_s") == [(1, 16.0), (2, 20.0)]
    assert _values(acc, "val/psnr") == [(2, 21.5)]
    [image] = acc.Images("samples")
    assert (image.step, image.width, image.height) == (2, 48, 64)
    assert not os.path.exists(log.tb_dir)  # the local copy goes once uploaded

    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["val_psnr"] == 21.5
    # the step rows print nothing (the loop prints the progress line); validation prints one line
    assert capsys.readouterr().out == "[vidgen train] step 2 val_psnr=21.5000 val_ssim=0.7500\n"


def test_a_resumed_run_starts_a_new_event_file_and_hides_the_retrained_steps(tmp_path):
    run = str(tmp_path / "run")
    log = MetricsLog(run, rank=0, resume_step=0)
    for step, loss in [(1, 0.9), (2, 0.8), (3, 0.7)]:
        log.step(step, 0, {"loss": loss}, 0.1, 40.0, 1e-3)
    log.close()  # as if the run crashed after step 3 with its checkpoint at step 2

    log = MetricsLog(run, rank=0, resume_step=2)
    log.step(3, 0, {"loss": 0.65}, 0.1, 40.0, 1e-3)
    log.step(4, 0, {"loss": 0.6}, 0.1, 40.0, 1e-3)
    log.close()

    assert len(os.listdir(os.path.join(run, "tb"))) == 2
    # TensorBoard merges the files; the first run's step 3 is purged, as in metrics.jsonl
    assert _values(_events(run), "train/loss") == [(1, 0.9), (2, 0.8), (3, 0.65), (4, 0.6)]
    assert [(r["step"], r["loss"]) for r in _rows(run)] == [(1, 0.9), (2, 0.8), (3, 0.65), (4, 0.6)]


def test_other_ranks_write_and_print_nothing(tmp_path, capsys):
    run = str(tmp_path / "run")
    log = MetricsLog(run, rank=1, resume_step=0)
    log.step(1, 0, {"loss": 0.5}, 0.1, 40.0, 1e-3)
    log.extra(1, {"val_psnr": 20.0})
    log.image("samples", 1, np.zeros((8, 8, 3), np.uint8))
    log.say("checkpoint at step 1")
    log.close()
    assert not os.path.exists(run)
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------------------------
# The worker's console


def test_worker_env_prints_each_line_once(monkeypatch, capsys):
    """Why every `[vidgen train]` line reached the driver twice, and the fix.

    In a Ray worker sys.stdout is Ray's own writer, not sys.__stdout__ (as under capsys here).
    Ray Train's print patch then tees each print to stdout and also logs it on the root logger,
    whose console handler (Ray Train's, here a stand-in) writes it to stderr: two lines. The worker
    env from `_worker_env` turns the patch off.
    """
    from ray.train.v2._internal.logging import patch_print

    from vidgen.train.trainer import _worker_env

    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)  # capsys's stderr, as Ray Train's handler writes to stderr
    level = root.level
    root.setLevel(logging.INFO)  # Ray Train's level for the workers' root logger
    root.addHandler(console)

    def times_shown(env: dict[str, str]) -> int:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            patch_print.patch_print_function()
            try:
                print("[vidgen train] step 1/2 (50%)")
            finally:
                builtins.print = patch_print._original_print
        out, err = capsys.readouterr()
        return (out + err).count("[vidgen train] step 1/2 (50%)")

    try:
        monkeypatch.delenv("RAY_TRAIN_ENABLE_PRINT_PATCH", raising=False)
        assert times_shown({}) == 2  # Ray's default: if this fails, Ray changed; recheck the fix
        assert times_shown(_worker_env()) == 1
    finally:
        root.removeHandler(console)
        root.setLevel(level)


def test_worker_env_keeps_the_drivers_values(monkeypatch):
    from vidgen.train.trainer import _worker_env

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "1")
    env = _worker_env()
    assert env["DS_ACCELERATOR"] == "cpu"
    assert env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "1"  # someone debugging Ray Train's logs asked for it


def test_quiet_worker_logs_hides_library_info_and_internal_warnings_keeps_the_rest(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)  # as Ray Train leaves it in a worker
    try:
        with warnings.catch_warnings(record=True) as caught:  # restores the filters afterwards
            warnings.simplefilter("always")
            quiet_worker_logs()
            for module in ("torch.distributed.distributed_c10d", "deepspeed.runtime.engine", "vidgen.models.gan"):
                warnings.warn_explicit(f"from {module}", UserWarning, "f.py", 1, module=module)
        assert not root.isEnabledFor(logging.INFO) and root.isEnabledFor(logging.WARNING)
    finally:
        root.setLevel(level)
    import deepspeed.utils

    assert not deepspeed.utils.logger.isEnabledFor(logging.INFO)  # no `[INFO] [config.py:...]` dump
    assert deepspeed.utils.logger.isEnabledFor(logging.WARNING)
    assert [str(w.message) for w in caught] == ["from vidgen.models.gan"]


def test_a_failed_look_for_a_stop_request_is_not_a_stop(tmp_path, monkeypatch):
    """Rank 0 looks for RUN/_stop_requested every half second: a throttled request must not end the run."""
    from vidgen import storage
    from vidgen.train import loop
    from vidgen.train.config import validate

    cfg = validate({"family": "gan", "preset": "tiny", "data": str(tmp_path), "run": str(tmp_path / "run")})
    check = loop.StopCheck(cfg, rank=0, device="cpu")

    def throttled(uri):
        raise storage.StorageError(f"{uri}: S3 error SlowDown")

    monkeypatch.setattr(storage, "exists", throttled)
    assert check() is None


def test_ray_data_console_drops_the_progress_bar_notice_and_keeps_warnings(monkeypatch):
    """Every process that ran a dataset printed "Progress bars disabled. To enable, ..." (vidgen turns
    them off); vidgen's Ray Data logging config, loaded by Ray Data's own loader, drops that notice
    from the console and keeps Ray Data's other warnings and the file log."""
    from importlib import resources

    from ray.data._internal import logging as ray_data_logging

    monkeypatch.setenv("RAY_DATA_LOGGING_CONFIG", str(resources.files("vidgen") / "assets" / "ray-data-logging.yaml"))
    config = ray_data_logging._get_logging_config()
    console = ray_data_logging._create_handlers(config, ray_data_logging._create_formatters(config),
                                                ray_data_logging._create_filters(config))["console"]

    def shown(message: str, level: int = logging.WARNING, args=None, **extra) -> bool:
        record = logging.LogRecord("ray.data._internal.progress", level, "f.py", 1, message, args, None)
        record.__dict__.update(extra)
        return record.levelno >= console.level and all(f.filter(record) for f in console.filters)

    assert not shown("Progress bars disabled. To enable, set `ray.data.DataContext.get_current()...`")
    assert shown("Operator X is backpressured: 1 of 2 CPUs free")
    assert not shown("a record Ray Data marks hidden", hide=True)
    assert not shown("Execution finished in 1.2 seconds", level=logging.INFO)
    assert shown("a message whose %s do not match its %d", args=("arguments",))  # filtering never formats it
