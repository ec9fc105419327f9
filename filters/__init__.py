"""The content filter: a pure-Python rule engine and a thin mitmproxy addon over it."""
