"""The requests/blocks chart as inline SVG: two polylines over the last hour, drawn on the server (no script)."""
from __future__ import annotations

import time

WIDTH, HEIGHT, PAD = 600, 160, 28


def _points(values: list[int], top: int) -> str:
    n = max(len(values) - 1, 1)
    inner_w, inner_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD
    return " ".join(f"{PAD + i * inner_w / n:.1f},{HEIGHT - PAD - (v / top) * inner_h:.1f}"
                    for i, v in enumerate(values))


def chart(rows: list[list[int]]) -> dict:
    """What the template draws: polyline points for requests and blocks, the y scale, the time labels."""
    requests = [r[1] for r in rows]
    blocks = [r[2] for r in rows]
    top = max([*requests, 1])
    label = lambda ts: time.strftime("%H:%M", time.localtime(ts))  # noqa: E731
    return {
        "width": WIDTH, "height": HEIGHT, "pad": PAD, "top": top,
        "requests": _points(requests, top), "blocks": _points(blocks, top),
        "total_requests": sum(requests), "total_blocks": sum(blocks), "points": len(rows),
        "start": label(rows[0][0]) if rows else "", "end": label(rows[-1][0]) if rows else "",
    }
