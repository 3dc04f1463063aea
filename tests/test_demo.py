"""`vidgen demo --minutes 2`: a reduced but complete run of every stage, through the command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from vidgen import media

pytestmark = pytest.mark.slow


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("href", "src", "poster") and v:
                self.refs.append(v)


def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "VIDGEN_OBJECT_STORE_BYTES": str(512 * 1024**2), "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-m", "vidgen.cli", "demo", "--minutes", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "vidgen demo summary" in proc.stdout and re.search(r"\[demo 8/8\] write the gallery: done", proc.stdout)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["gan"]["steps"] >= 1 and summary["restore"]["steps"] >= 1
    assert 0.0 <= summary["gan"]["label_accuracy"]["samples"] <= 1.0
    assert "val_psnr_gain" in summary["restore"]
    assert summary["ads"]["ok"] == summary["ads"]["items"] == 3
    assert summary["education"]["ok"] == summary["education"]["items"] == 3

    for name in ("gan", "restore"):
        assert (out / "models" / name / "model.safetensors").exists()
        assert (out / "runs" / name / "loss.png").exists()
    ad = media.probe(str(out / "renders" / "ads" / "ad-circle.mp4"))
    assert (ad.width, ad.height, ad.fps, ad.frames, ad.audio) == (256, 256, 8.0, 24, True)
    assert media.probe(str(out / "renders" / "ads" / "ad-circle--9x16.mp4")).width == 216
    lecture = media.probe(str(out / "renders" / "education" / "lecture-01.mp4"))
    assert lecture.frames == 24 and lecture.fps == 8.0
    compare = media.probe(str(out / "renders" / "education" / "lecture-01--compare.mp4"))  # input | restored
    assert (compare.width, compare.height) == (2 * lecture.width, lecture.height)
    assert summary["education"]["videos"] == 6  # each item: the restored video and the comparison
    assert summary["ads"]["videos"] > summary["ads"]["items"]  # renditions count too

    page = _Links()
    page.feed((out / "index.html").read_text())
    local = [r for r in page.refs if not r.startswith(("http:", "https:", "#"))]
    assert local and all((out / r).exists() for r in local), [r for r in local if not (out / r).exists()]
