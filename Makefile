# carpguard: one verb per target. `make run` and `make test` set up everything on a fresh Debian box.
SHELL      := /bin/bash
PYTHON     ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
APPLIANCE  := $(VENV)/bin/appliance
CONFIG     ?= examples/appliance.yaml
LISTEN     ?= 127.0.0.1:3128
FREEBSD_DIST ?=
OUT        ?= dist
PYTEST_ARGS ?=
# 3 on 2 cores: fresh clones took 592 s on 3 workers, 612 s on 2 (both cores about 95% busy)
TEST_WORKERS ?= 3
TIMING_WORKERS ?= 2
export PATH := $(PATH):/usr/sbin:/sbin

# binary:Debian-package pairs each verb needs; installed with apt-get when missing and we are root
TOOLS_TEST  := ucarp:ucarp sshd:openssh-server ssh:openssh-client rsync:rsync makefs:makefs \
               shellcheck:shellcheck sgdisk:gdisk qemu-img:qemu-utils ip:iproute2 arping:iputils-arping \
               curl:curl bsdtar:libarchive-tools xz:xz-utils mformat:mtools mkfs.vfat:dosfstools \
               openssl:openssl tcpdump:tcpdump lintian:lintian mmdebstrap:mmdebstrap unshare:util-linux \
               dpkg-deb:dpkg qemu-system-x86_64:qemu-system-x86 chromium:chromium
TOOLS_IMAGE := makefs:makefs shellcheck:shellcheck sgdisk:gdisk qemu-img:qemu-utils bsdtar:libarchive-tools \
               xz:xz-utils mformat:mtools mkfs.vfat:dosfstools mmdebstrap:mmdebstrap mke2fs:e2fsprogs \
               debugfs:e2fsprogs dpkg-scanpackages:dpkg-dev unshare:util-linux dpkg-deb:dpkg
TOOLS_LAB   := ucarp:ucarp ip:iproute2 arping:iputils-arping curl:curl sshd:openssh-server rsync:rsync
TOOLS_BENCH := $(TOOLS_TEST) wrk:wrk squid:squid-openssl /usr/lib/squid/security_file_certgen:squid-openssl e2guardian:e2guardian calamaris:calamaris sarg:sarg
TOOLS_VMLAB := qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils ip:iproute2 arping:iputils-arping \
               ssh:openssh-client curl:curl

# $(call apt_tools,PAIRS): no network work when everything is already there
define apt_tools
	@missing=""; for t in $(1); do command -v "$${t%%:*}" >/dev/null 2>&1 || missing="$$missing $${t##*:}"; done; \
	missing=$$(echo $$missing | tr ' ' '\n' | sort -u | tr '\n' ' '); \
	if [ -n "$${missing// /}" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "make: installing Debian packages: $$missing"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get -o DPkg::Lock::Timeout=300 update -qq && \
	    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "make: not root, not installing: $$missing (tests needing them are skipped)"; fi; \
	fi
endef

.PHONY: run test test-vm screenshots bench image lab venv apt-test apt-image apt-lab apt-bench apt-deb clean

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

apt-test:  ; $(call apt_tools,$(TOOLS_TEST))
apt-image: ; $(call apt_tools,$(TOOLS_IMAGE))
apt-lab:   ; $(call apt_tools,$(TOOLS_LAB))
apt-bench: ; $(call apt_tools,$(TOOLS_BENCH))

run: venv
	$(APPLIANCE) proxy -c $(CONFIG) --listen $(LISTEN) --access-log - 

# make test runs in three parts. First every module not marked `timing` or `vm` on TEST_WORKERS pytest-xdist workers
# (whole modules each, the image builds first: tests/conftest.py); they keep both cores busy. Then the VM lab (`vm`:
# two qemu guests, TCG here) and the `timing` modules (failover and timeout bounds, on TIMING_WORKERS) side by side:
# the timing part needs a core only now and then (about 40% of two), so the VM part runs at nice 19 and boots its
# guests in what is left, then waits for $CARPGUARD_TEST_QUIET (touched when the timing part ends) before its first
# check, so no figure of either part is measured beside the other. The VM part boots the image the first part built
# ($CARPGUARD_TEST_SHARE: tests/support/debian_build.py); its output follows the timing part's. TEST_WORKERS=0: the
# whole suite in one process. test-vm: the VM lab alone. The VM part captures at sys level only: its checks print
# their figures (boot, outage, phases).
PYTEST = $(PY) -m pytest -q -p no:cacheprovider
VM_TESTS = tests/integration/lab/test_vmlab.py
test: venv apt-test apt-deb apt-vmlab
	@start=$$(date +%s); share=$$(mktemp -d /tmp/carpguard-test.XXXXXX); vm=""; \
	trap '[ -z "$$vm" ] || { kill -TERM $$vm 2>/dev/null; wait $$vm; }; rm -rf "$$share"' EXIT; \
	export CARPGUARD_TEST_SHARE=$$share CARPGUARD_REQUIRE_BROWSER=1; \
	if [ "$(TEST_WORKERS)" = 0 ]; then \
	  $(PYTEST) --durations=25 $(PYTEST_ARGS) tests; rc=$$?; \
	else \
	  $(PYTEST) -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder -m "not timing and not vm" --durations=25 \
	    $(PYTEST_ARGS) tests; rc=$$?; t1=$$(date +%s); echo "make test: parallel part $$(( t1 - start )) s, exit $$rc"; \
	  CARPGUARD_TEST_QUIET=$$share/quiet nice -n 19 $(PYTEST) -m "vm" --capture=sys --durations=10 $(PYTEST_ARGS) $(VM_TESTS) > $$share/vm.log 2>&1 & vm=$$!; \
	  $(PYTEST) -n $(TIMING_WORKERS) --dist loadgroup -m "timing and not vm" --durations=10 $(PYTEST_ARGS) tests; rc2=$$?; \
	  touch $$share/quiet; echo "make test: timing part $$(( $$(date +%s) - t1 )) s, exit $$rc2"; [ $$rc -ne 0 ] || rc=$$rc2; \
	  wait $$vm; rc2=$$?; vm=""; cat $$share/vm.log; [ $$rc -ne 0 ] || rc=$$rc2; \
	  echo "make test: VM part $$(( $$(date +%s) - t1 )) s (beside the timing part), exit $$rc2"; \
	fi; \
	echo "make test: $$(( $$(date +%s) - start )) s wall, exit $$rc"; exit $$rc

test-vm: venv apt-test apt-deb apt-vmlab
	$(PYTEST) --capture=sys --durations=10 $(PYTEST_ARGS) $(VM_TESTS)

# the browser tests (status page, HTML report) again, their screenshots copied to docs/images/ for the admin guide
screenshots: venv apt-test
	CARPGUARD_REQUIRE_BROWSER=1 CARPGUARD_SCREENSHOT_DIR=$(CURDIR)/docs/images $(PYTEST) -m "browser" tests

bench: venv apt-bench
	$(PY) -m tests.bench

image: venv apt-image apt-deb
	$(APPLIANCE) image -c $(CONFIG) --out $(OUT) $(if $(FREEBSD_DIST),--freebsd-dist $(FREEBSD_DIST))

lab: venv apt-lab
	$(APPLIANCE) -c $(CONFIG) lab up

# the Debian cluster booted as qemu VMs from $(OUT)/NODE.qcow2 (`make image` first when no image is there)
.PHONY: vmlab apt-vmlab
apt-vmlab: ; $(call apt_tools,$(TOOLS_VMLAB))
vmlab: CONFIG = examples/debian.yaml
vmlab: venv apt-vmlab
	@ls $(OUT)/*.qcow2 >/dev/null 2>&1 || $(MAKE) image CONFIG=$(CONFIG) OUT=$(OUT)
	$(APPLIANCE) -c $(CONFIG) vmlab up --images $(OUT)

clean:
	rm -rf $(OUT) build *.egg-info .pytest_cache

# dist/carpguard_<version>_amd64.deb: a venv on Debian's /usr/bin/python3 in /opt/carpguard, wheels cached in
# ~/.cache/carpguard/wheels (the second build is offline); built from the last commit (packaging/build_deb.py)
.PHONY: deb
# the package's venv is made with Debian's own python3, which needs python3-venv (no binary to test for)
apt-deb:
	@/usr/bin/python3 -c 'import ensurepip' 2>/dev/null || { [ "$$(id -u)" = 0 ] && \
	  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends python3-venv >/dev/null; } || true
deb: venv apt-deb
	$(PY) packaging/build_deb.py --out $(OUT)
