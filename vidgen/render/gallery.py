"""The gallery page of a render batch: `OUT/index.html`, posters, players and a table of records.

Links are relative (`sale-01.mp4`, `items/sale-01.json`), so the page works opened from a local
folder and served from the output prefix (a static site, a CDN, a presigned listing) alike. All
text that came from a user (ids, titles, errors, URIs) is escaped. The page is a function of the
records only (no clock), so re-running an unchanged batch writes the same bytes.
"""

from __future__ import annotations

import html

from vidgen import storage
from vidgen.render.record import RenderRecord

STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;background:#fafafa;color:#222}
.grid{display:flex;flex-wrap:wrap;gap:1rem}
figure{margin:0;padding:.6rem;background:#fff;border:1px solid #ddd;border-radius:6px}
figure.error{border-color:#c33}
figcaption{font-size:.85rem;margin-top:.4rem}
video,img{display:block;max-width:320px;height:auto;background:#000}
.renditions a{margin-right:.5rem}
table{border-collapse:collapse;margin-top:2rem;font-size:.85rem}
td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:left}
td.error{color:#c33}
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _name(uri: str | None) -> str | None:
    """An output's name relative to the batch output (they all sit directly under it)."""
    return storage.basename(uri) if uri else None


def _mime(name: str) -> str:
    return "video/webm" if name.endswith(".webm") else "video/mp4"


def render_html(name: str, records: list[RenderRecord]) -> str:
    """The page for a batch `name` and its records (in spec order)."""
    ok = sum(r.is_ok for r in records)
    cards, rows = [], []
    for r in records:
        rid = _e(r.id)
        record_link = f"items/{rid}.json"
        if r.is_ok:
            video, poster = _name(r.uri), _name(r.poster)
            extra = [(x.name, x) for x in r.renditions] + ([("compare", r.compare)] if r.compare else [])
            links = " ".join(f'<a href="{_e(_name(x.uri))}">{_e(label)} {x.width}x{x.height}</a>' for label, x in extra)
            cards.append(
                f'<figure id="{rid}"><video controls preload="none" poster="{_e(poster)}" '
                f'width="{r.width}" height="{r.height}"><source src="{_e(video)}" type="{_mime(video)}">'
                f'</video><figcaption><a href="{_e(video)}"><b>{rid}</b></a> {_e(r.mode)} '
                f'{r.width}x{r.height}, {r.seconds:g} s'
                + (f'<div class="renditions">{links}</div>' if links else "")
                + "</figcaption></figure>")
        else:
            cards.append(f'<figure id="{rid}" class="error"><figcaption><b>{rid}</b> {_e(r.mode)}: '
                         f'failed<br>{_e(r.error)}</figcaption></figure>')
        size = f"{r.width}x{r.height}" if r.width else ""
        rows.append(
            "<tr>" + "".join(f"<td>{c}</td>" for c in (
                f'<a href="{record_link}">{rid}</a>', _e(r.mode), _e(r.status), _e(size), _e(r.frames),
                _e(r.seconds), _e(r.bytes), _e(r.model), _e((r.model_sha256 or "")[:12]), _e(r.seed),
                _e((r.spec_hash or "")[:12])))
            + f'<td class="error">{_e(r.error)}</td></tr>')
    head = ("<th>id</th><th>mode</th><th>status</th><th>size</th><th>frames</th><th>seconds</th><th>bytes</th>"
            "<th>model</th><th>weights</th><th>seed</th><th>spec hash</th><th>error</th>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(name)}</title><style>{STYLE}</style></head><body>\n"
        f"<h1>{_e(name)}</h1><p>{ok} of {len(records)} items rendered. "
        '<a href="manifest.jsonl">manifest.jsonl</a></p>\n'
        f'<div class="grid">\n' + "\n".join(cards) + "\n</div>\n"
        f"<table><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(rows) + "\n</tbody></table>\n"
        "</body></html>\n"
    )
