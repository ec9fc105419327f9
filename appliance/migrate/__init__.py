"""Migration from other filters: SquidGuard's squidGuard.conf read, judged and written as the `filter:` section."""
