"""High availability: the CARP supervisor, the speaker, the role engine, the watchdog, addresses."""
