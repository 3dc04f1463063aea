"""Regenerate the RayService's embedded Serve config from serve/config.yaml.

    python cluster/kuberay/sync_serve_config.py           # rewrite serveConfigV2 in rayservice.yaml
    python cluster/kuberay/sync_serve_config.py --check   # exit 1 when it is out of date (tests do this)

serveConfigV2 = serve/config.yaml, with cluster/kuberay/serve-overrides.yaml merged over it (the
cluster's models, S3 roots and listen address). Mappings merge key by key, `applications` are
matched by name, any other value replaces. Only the serveConfigV2 block of rayservice.yaml is
rewritten; the rest of the file (and its comments) stays as it is.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SERVE_CONFIG = REPO / "serve" / "config.yaml"
OVERRIDES = HERE / "serve-overrides.yaml"
RAYSERVICE = HERE / "rayservice.yaml"
BLOCK = re.compile(r"^(?P<indent>[ ]*)serveConfigV2: \|\n(?P<body>(?:(?P=indent)[ ]+.*\n|[ ]*\n)*)", re.MULTILINE)


def merge(base, override, where: str = ""):
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge(base[k], v, f"{where}.{k}") if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(override)


def expected_serve_config(serve_config: Path = SERVE_CONFIG, overrides: Path = OVERRIDES) -> dict:
    config = yaml.safe_load(serve_config.read_text()) or {}
    patch = yaml.safe_load(overrides.read_text()) or {}
    apps_patch = patch.pop("applications", {}) or {}
    merged = merge(config, patch)
    apps = [dict(a) for a in merged.get("applications") or []]
    names = [a.get("name") for a in apps]
    for name, app_patch in apps_patch.items():
        if name not in names:
            raise SystemExit(f"{overrides}: applications.{name}: no application of that name in {serve_config} "
                             f"(it has {', '.join(map(str, names)) or 'none'})")
        i = names.index(name)
        apps[i] = merge(apps[i], app_patch)
    merged["applications"] = apps
    return merged


def embedded_serve_config(rayservice: Path = RAYSERVICE) -> dict:
    docs = [d for d in yaml.safe_load_all(rayservice.read_text()) if d and d.get("kind") == "RayService"]
    return yaml.safe_load(docs[0]["spec"]["serveConfigV2"])


def render_block(config: dict, indent: str) -> str:
    text = yaml.safe_dump(config, sort_keys=False, width=100)
    pad = indent + "  "
    return f"{indent}serveConfigV2: |\n" + "".join(pad + line if line.strip() else "\n" for line in text.splitlines(True))


def main(argv: list[str]) -> int:
    expected = expected_serve_config()
    if "--check" in argv:
        if embedded_serve_config() != expected:
            print(f"{RAYSERVICE.relative_to(REPO)}: serveConfigV2 differs from serve/config.yaml + "
                  f"serve-overrides.yaml; run: python cluster/kuberay/sync_serve_config.py", file=sys.stderr)
            return 1
        print("serveConfigV2 is up to date")
        return 0
    text = RAYSERVICE.read_text()
    m = BLOCK.search(text)
    if not m:
        raise SystemExit(f"{RAYSERVICE}: no `serveConfigV2: |` block to rewrite")
    RAYSERVICE.write_text(text[: m.start()] + render_block(expected, m["indent"]) + text[m.end():])
    assert embedded_serve_config() == expected
    print(f"wrote serveConfigV2 of {RAYSERVICE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
