"""Inline SVG charts for the HTML page (no script, no external asset): hourly bars and horizontal top-N bars."""
from __future__ import annotations

from html import escape

REQ_COLOR, BLOCK_COLOR = "#4a7fb5", "#c8423b"


def _nice_max(v: int) -> int:
    """The axis top: v rounded up to 1, 2 or 5 times a power of ten (at least 1)."""
    if v <= 1:
        return 1
    step = 10 ** (len(str(v)) - 1)
    for m in (1, 2, 5, 10):
        if v <= m * step:
            return m * step
    return 10 * step


def hourly(hours: list[dict], width: int = 960, height: int = 240) -> str:
    """Requests per hour as bars with the blocked part drawn over them in red; axis top, gridlines, hour labels."""
    left, bottom, top = 56, 34, 12
    plot_w, plot_h = width - left - 8, height - bottom - top
    n = max(len(hours), 1)
    ymax = _nice_max(max((h["requests"] for h in hours), default=0))
    bw = plot_w / n
    out = [f'<svg class="chart hourly" role="img" aria-label="requests and blocks per hour" viewBox="0 0 {width} {height}" '
           f'width="100%" xmlns="http://www.w3.org/2000/svg">']
    for frac in (0, 0.5, 1):
        y = top + plot_h * (1 - frac)
        out.append(f'<line x1="{left}" x2="{width - 8}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="axis">{int(ymax * frac):,}</text>')
    every = max(1, round(n / 12))
    for i, h in enumerate(hours):
        x = left + i * bw
        for key, cls in (("requests", "req"), ("blocks", "blk")):
            hgt = plot_h * h[key] / ymax
            if h[key]:
                hgt = max(hgt, 1.0)  # a non-zero hour stays visible
            out.append(f'<rect class="{cls}" x="{x + bw * 0.1:.2f}" y="{top + plot_h - hgt:.2f}" width="{bw * 0.8:.2f}" '
                       f'height="{hgt:.2f}"><title>{escape(h["hour"])}: {h[key]:,} {key}</title></rect>')
        if i % every == 0:
            label = h["hour"][11:] if n <= 24 else h["hour"][5:]
            out.append(f'<text x="{x + bw / 2:.1f}" y="{height - bottom + 16}" text-anchor="middle" class="axis">'
                       f'{escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def hbars(rows: list[tuple[str, int]], color: str = BLOCK_COLOR, width: int = 460, row_h: int = 24) -> str:
    """One horizontal bar per (label, value), longest first as given; label left, value right of the bar."""
    if not rows:
        return ""
    label_w, value_w = 170, 70
    plot_w = width - label_w - value_w
    vmax = max(v for _, v in rows) or 1
    height = row_h * len(rows) + 4
    out = [f'<svg class="chart bars" role="img" viewBox="0 0 {width} {height}" width="100%" '
           f'xmlns="http://www.w3.org/2000/svg">']
    for i, (label, v) in enumerate(rows):
        y = 2 + i * row_h
        w = max(plot_w * v / vmax, 1.0)
        short = label if len(label) <= 26 else label[:25] + "…"
        out.append(f'<text x="{label_w - 6}" y="{y + row_h * 0.68:.1f}" text-anchor="end" class="label">'
                   f'<title>{escape(label)}</title>{escape(short)}</text>'
                   f'<rect x="{label_w}" y="{y + 3}" width="{w:.2f}" height="{row_h - 6}" fill="{color}" rx="2">'
                   f'<title>{escape(label)}: {v:,}</title></rect>'
                   f'<text x="{label_w + w + 6:.1f}" y="{y + row_h * 0.68:.1f}" class="value">{v:,}</text>')
    out.append("</svg>")
    return "".join(out)
