"""The status page's HTML (jinja2, autoescaped): inline CSS and SVG, no script, readable with JavaScript off."""
from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ s.node }}: {{ s.role }} · carpguard status</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1100px}
h1{font-size:1.4em;margin:0 0 .2em} h2{font-size:1.1em;margin:1.4em 0 .4em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.3em 0} td,th{padding:.2em .7em;text-align:left;border-bottom:1px solid #eee}
.role{font-weight:bold;padding:.1em .5em;border-radius:.3em}
.MASTER{background:#d4f4d4} .BACKUP{background:#e4ecf7} .INIT,.UNKNOWN{background:#f7e4c4}
.warn{color:#a40} .muted{color:#777} .num{text-align:right;font-variant-numeric:tabular-nums}
svg .req{fill:none;stroke:#2a6fdb;stroke-width:2} svg .blk{fill:none;stroke:#d33;stroke-width:2}
svg .axis{stroke:#999} svg text{font-size:11px;fill:#555}
</style></head><body>
<h1>{{ s.node }} <span class="role {{ s.role }}" id="role">{{ s.role }}</span></h1>
<p class="muted">carpguard status, read-only · {{ when(s.at) }}</p>

<h2>Cluster</h2>
<table id="vhids"><tr><th>vhid</th><th>role</th><th>VIP</th><th>interface</th><th>advskew</th><th>since</th></tr>
{% for v in s.vhids %}<tr><td>{{ v.vhid }}</td><td><span class="role {{ v.role }}">{{ v.role }}</span></td>
<td>{{ v.vip }}</td><td>{{ v.iface }}</td><td>{{ v.advskew }}</td><td>{{ when(v.since) }}</td></tr>{% endfor %}
</table>
<table id="members"><tr><th>node</th><th>role</th><th>sync address</th><th>generation</th><th>asked</th></tr>
<tr><td>{{ s.node }} (this node)</td><td>{{ s.role }}</td><td></td><td class="num">{{ s.sync.generation if s.sync.generation is not none else "none" }}</td><td></td></tr>
{% for name, p in s.peers.items() %}<tr><td>{{ name }}</td><td>{{ p.role or "?" }}</td><td>{{ p.sync }}</td>
<td class="num">{{ p.generation if p.generation is not none else "?" }}</td>
<td>{% if p.error %}<span class="warn">{{ p.error }}</span> {% endif %}{% if p.at %}{{ when(p.at) }} ({{ p.age }} s ago){% endif %}{% if p.stale %} <span class="warn stale">stale</span>{% endif %}</td></tr>{% endfor %}
</table>
<p>VIP holder: {% if holder %}<b>{{ holder }}</b>{% else %}<span class="warn">none known</span>{% endif %}
{% if s.demoted %} · <span class="warn">demoted by admin</span>{% endif %}
{% if s.health_demoted %} · <span class="warn">demoted: proxy unhealthy</span>{% endif %}</p>
<p>Engine: {% if s.engine.running %}{{ s.engine.engine }} (supervisor pid {{ s.engine.supervisor_pid }}{% if s.engine.healthy is not none %}, {{ "healthy" if s.engine.healthy else "unhealthy" }}{% endif %}){% else %}<span class="warn">not running</span>{% endif %}
{% if s.engine.demoted_reason %} · <span class="warn">{{ s.engine.demoted_reason }}</span>{% endif %}</p>

<h2>Last transitions</h2>
<table id="transitions">{% for t in s.transitions %}<tr><td class="muted">{{ t.at }}</td><td>{{ t.text }}</td></tr>
{% else %}<tr><td class="muted">none recorded</td></tr>{% endfor %}</table>

<h2>Sync</h2>
<p id="generation">Generation: <b>{{ s.sync.generation if s.sync.generation is not none else "no release yet" }}</b></p>
<table id="sync">{% for t in s.sync.last %}<tr><td class="muted">{{ t.at }}</td><td>{{ t.text }}</td></tr>
{% else %}<tr><td class="muted">no sync recorded on this node</td></tr>{% endfor %}</table>

<h2>Proxy</h2>
<p>{% if s.proxy.up %}up, pid {{ s.proxy.pid }}, {{ c.get("appliance_proxy_workers", 0)|int }} worker(s){% else %}<span class="warn">down</span>{% endif %}</p>
<table id="counters">
<tr><td>requests</td><td class="num">{{ c.get("appliance_proxy_requests_total", 0)|int }}</td></tr>
<tr><td>CONNECTs</td><td class="num">{{ c.get("appliance_proxy_connects_total", 0)|int }}</td></tr>
<tr><td>blocked</td><td class="num">{{ blocks }}</td></tr>
<tr><td>denied clients</td><td class="num">{{ c.get("appliance_proxy_denied_total", 0)|int }}</td></tr>
<tr><td>refused (never proxied)</td><td class="num">{{ refused }}</td></tr>
<tr><td>errors</td><td class="num">{{ c.get("appliance_proxy_errors_total", 0)|int }}</td></tr>
</table>

<h2>Requests and blocks, last hour</h2>
<svg id="chart" role="img" width="{{ g.width }}" height="{{ g.height }}" viewBox="0 0 {{ g.width }} {{ g.height }}"
 data-points="{{ g.points }}" data-requests="{{ g.total_requests }}" data-blocks="{{ g.total_blocks }}">
<title>requests (blue) and blocks (red) per minute, {{ g.start }} to {{ g.end }}</title>
<line class="axis" x1="{{ g.pad }}" y1="{{ g.height - g.pad }}" x2="{{ g.width - g.pad }}" y2="{{ g.height - g.pad }}"/>
<line class="axis" x1="{{ g.pad }}" y1="{{ g.pad }}" x2="{{ g.pad }}" y2="{{ g.height - g.pad }}"/>
<text x="2" y="{{ g.pad + 4 }}">{{ g.top }}</text><text x="2" y="{{ g.height - g.pad + 4 }}">0</text>
<text x="{{ g.pad }}" y="{{ g.height - 8 }}">{{ g.start }}</text>
<text x="{{ g.width - g.pad - 30 }}" y="{{ g.height - 8 }}">{{ g.end }}</text>
<polyline class="req" points="{{ g.requests }}"/><polyline class="blk" points="{{ g.blocks }}"/>
</svg>
<p class="muted">per minute: <span style="color:#2a6fdb">requests</span> ({{ g.total_requests }} in the hour),
<span style="color:#d33">blocks</span> ({{ g.total_blocks }})</p>

<h2>Today</h2>
{% set t = s.traffic.today %}
<table id="today"><tr><td>requests</td><td class="num">{{ t.requests }}</td></tr>
<tr><td>blocked</td><td class="num">{{ t.blocked }} ({{ "%.1f"|format(t.blocked_share * 100) }} %)</td></tr>
<tr><td>clients</td><td class="num">{{ t.clients }}</td></tr>
<tr><td>top categories</td><td>{% for k, n in t.categories %}{{ k }} {{ n }}{{ ", " if not loop.last }}{% else %}none{% endfor %}</td></tr>
<tr><td>top blocked domains</td><td>{% for k, n in t.blocked_domains %}{{ k }} {{ n }}{{ ", " if not loop.last }}{% else %}none{% endfor %}</td></tr>
{% if t.errors %}<tr><td class="warn">log errors</td><td class="warn">{{ t.errors|join("; ") }}</td></tr>{% endif %}
</table>
<p class="muted"><a href="/status.json">status.json</a> · <a href="/metrics">metrics</a></p>
</body></html>
"""
