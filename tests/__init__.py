"""carpguard tests: unit tests with fakes, integration tests with real mitmproxy, sshd, rsync, ucarp, makefs."""
