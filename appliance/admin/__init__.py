"""The read-only status page: a small HTTPS server (stdlib http.server + ssl) serving /, /status.json and /metrics."""
