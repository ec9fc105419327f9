"""The 403 block page: HTML naming category, URL, client, time and admin contact; plain text for non-HTML clients."""
from __future__ import annotations

import datetime as dt
import html

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Access blocked</title>
<style>body{{font-family:sans-serif;max-width:40em;margin:3em auto;color:#222}}
h1{{color:#b00}}dt{{font-weight:bold;margin-top:.6em}}code{{word-break:break-all}}</style></head>
<body><h1>Access blocked</h1>
<p>{reason}</p>
<dl>
<dt>Category</dt><dd>{category}</dd>
<dt>URL</dt><dd><code>{url}</code></dd>
<dt>Client</dt><dd>{client}</dd>
<dt>Time</dt><dd>{time}</dd>
<dt>Rule</dt><dd>{source}</dd>
</dl>
<p>If you think this is a mistake, contact {admin}.</p>
</body></html>
"""


def wants_html(accept: str | None) -> bool:
    """Browsers send text/html (or */*); curl sends */* too, so only an explicit non-HTML Accept gets text."""
    if not accept:
        return True
    a = accept.lower()
    return "text/html" in a or "application/xhtml" in a or a.strip().startswith("*/*")


def render(decision, url: str, client: str, admin: str, accept: str | None = None,
           when: dt.datetime | None = None) -> tuple[bytes, str]:
    """(body, content type) for a blocked or denied request."""
    when = when or dt.datetime.now().astimezone()
    stamp = when.strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    if decision.verdict == "deny":
        reason = "This computer is not allowed to use the proxy."
        category = "(client not allowed)"
    else:
        reason = "The page you asked for is blocked by the network's content filter."
        if decision.category == "appliance":  # a guard refusal: no list can allow it
            reason = "The proxy never goes to this destination, whatever the lists say."
        category = decision.category or "-"
    source = decision.source or "-"
    if decision.policy:
        source = f"{source} (policy {decision.policy})"
    if wants_html(accept):
        body = _PAGE.format(reason=html.escape(reason), category=html.escape(category), url=html.escape(url),
                            client=html.escape(client), time=html.escape(stamp), source=html.escape(source),
                            admin=html.escape(admin))
        return body.encode(), "text/html; charset=utf-8"
    text = (f"Access blocked\n{reason}\ncategory: {category}\nurl: {url}\nclient: {client}\ntime: {stamp}\n"
            f"rule: {source}\ncontact: {admin}\n")
    return text.encode(), "text/plain; charset=utf-8"
