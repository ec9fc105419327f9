"""The filtering proxy: processes, the mitmproxy addon, the CONNECT fast path, block page, PAC, log, metrics."""
