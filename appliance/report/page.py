"""The HTML report: one self-contained page (inline CSS and SVG, no script, no external asset) from the summary dict."""
from __future__ import annotations

import jinja2
from markupsafe import Markup

from appliance.report import charts
from appliance.report.summary import human_bytes

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>carpguard access report {{ s.period.first or '' }}</title>
<style>
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d232b}
header{background:#1f3347;color:#fff;padding:18px 28px}
header h1{margin:0;font-size:22px;font-weight:600} header p{margin:4px 0 0;color:#c9d5e1}
main{max-width:1100px;margin:0 auto;padding:20px 28px 40px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(190px,1fr));gap:14px;margin-bottom:18px}
.card,section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:14px 18px}
.card .k{color:#5b6673;font-size:13px;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:28px;font-weight:650;margin-top:2px} .card .sub{color:#5b6673;font-size:13px}
section{margin-bottom:18px} h2{font-size:17px;margin:0 0 10px}
.two{display:grid;grid-template-columns:repeat(auto-fit,minmax(440px,1fr));gap:18px}
.two section{margin:0} table{border-collapse:collapse;width:100%}
td,th{padding:4px 8px;border-bottom:1px solid #eceef1;text-align:left} td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.none{color:#5b6673;font-style:italic}
svg .grid{stroke:#e3e6ea} svg .axis,svg .label,svg .value{font-size:12px;fill:#5b6673} svg .label{fill:#1d232b}
svg rect.req{fill:#4a7fb5} svg rect.blk{fill:#c8423b}
.legend span{display:inline-block;width:11px;height:11px;border-radius:2px;margin:0 5px 0 14px;vertical-align:-1px}
.warn{background:#fff5db;border-left:4px solid #e0a100} footer{color:#5b6673;font-size:13px}
</style></head><body>
<header><h1>Access report</h1>
<p>{{ (s.period.first or 'no records')[:16]|replace('T', ' ') }} &ndash; {{ (s.period.last or '')[:16]|replace('T', ' ') }}{% if s.client_filter %} &middot; clients in {{ s.client_filter }}{% endif %}
{% if nodes %} &middot; nodes: {{ nodes|join(', ') }}{% endif %}</p></header>
<main>
<div class="cards">
<div class="card"><div class="k">Requests</div><div class="v" id="requests">{{ '{:,}'.format(s.requests) }}</div></div>
<div class="card"><div class="k">Blocked</div><div class="v" id="blocked">{{ '{:,}'.format(s.blocked) }}</div>
<div class="sub" id="blocked-share">{{ '%.1f'|format(100 * s.blocked_share) }} % of requests</div></div>
<div class="card"><div class="k">Data</div><div class="v" id="bytes">{{ bytes }}</div><div class="sub">{{ '{:,}'.format(s.bytes) }} bytes</div></div>
<div class="card"><div class="k">Refused by the appliance</div><div class="v" id="refused">{{ '{:,}'.format(refused) }}</div>
<div class="sub">whatever the lists say</div></div>
</div>
<section><h2>Requests and blocks per hour</h2>
<div class="legend"><span style="background:#4a7fb5"></span>requests<span style="background:#c8423b"></span>blocked</div>
{{ hourly }}</section>
<div class="two">
<section id="categories"><h2>Top categories</h2>{{ cat_chart or none }}</section>
<section id="domains"><h2>Top blocked domains</h2>{{ dom_chart or none }}</section>
</div><br>
<div class="two">
<section id="clients"><h2>Top clients by requests</h2>{{ table(s.top_clients, 'client', 'requests') }}</section>
<section id="blocking-clients"><h2>Top clients by blocks</h2>{{ table(s.top_blocked_clients, 'client', 'blocks') }}</section>
</div><br>
<section id="refusals"><h2>Refusals by reason</h2>{{ table(s.refusals, 'reason', 'count') }}
{% if s.untagged_blocks %}<p class="sub">{{ '{:,}'.format(s.untagged_blocks) }} blocked requests carry no category (a plain Squid log, or one written before the tag).</p>{% endif %}</section>
{% if warnings %}<section class="warn"><h2>Notes</h2><ul>{% for w in warnings %}<li>{{ w }}</li>{% endfor %}</ul></section>{% endif %}
<footer>Generated {{ s.generated }} by <code>appliance report</code> from {{ s.sources|length }} file(s).</footer>
</main></body></html>
"""
NONE = Markup('<p class="none">none</p>')


def _table(rows: list[dict], key: str, value: str) -> Markup:
    if not rows:
        return NONE
    body = "".join(f"<tr><td>{Markup.escape(r[key])}</td><td class=\"n\">{r[value]:,}</td></tr>" for r in rows)
    return Markup(f'<table><tr><th>{key}</th><th class="n">{value}</th></tr>{body}</table>')


def _warnings(s: dict) -> list[str]:
    out = []
    if s["bad_lines"]:
        out.append(f"{s['bad_lines']:,} lines were not access-log records; first: " + "; ".join(s["bad_samples"][:3]))
    out += [f"{src['file']}: read stopped after line {src['lines']}: {src['error']}" for src in s["sources"] if src["error"]]
    if not s["exact"]:
        out.append(f"more distinct domains or clients than the report keeps exactly: top counts may be low by up to "
                   f"{s['max_error']:,}")
    return out


def render(s: dict) -> str:
    """The whole page as one string (autoescaped: log text never becomes markup)."""
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    nodes = sorted({src["node"] for src in s["sources"] if src["node"]})
    return env.from_string(TEMPLATE).render(
        s=s, bytes=human_bytes(s["bytes"]), refused=s["refused"], nodes=nodes,
        hourly=Markup(charts.hourly(s["hours"])) if s["hours"] else NONE,
        cat_chart=Markup(charts.hbars([(r["category"], r["blocks"]) for r in s["categories"]])),
        dom_chart=Markup(charts.hbars([(r["domain"], r["blocks"]) for r in s["top_blocked_domains"]], charts.REQ_COLOR)),
        none=NONE, table=_table, warnings=_warnings(s))
