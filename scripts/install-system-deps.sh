#!/usr/bin/env bash
# Install the Debian/Ubuntu packages the test suite needs, when they are missing.
#
#   scripts/install-system-deps.sh          # as root, or a user with sudo
#
# Idempotent: packages already installed are left alone, and `apt-get update` runs only when
# something must be installed. Add a package to PACKAGES below (with a comment saying which tests
# need it); nothing else has to change.
set -euo pipefail

PACKAGES=(
    chromium          # tests/test_dashboard_browser.py: the dashboard in a headless browser
    chromium-driver   # ... and the WebDriver that Selenium drives it with (/usr/bin/chromedriver)
    systemd           # tests/test_systemd_unit.py: systemd-analyze verify / security
    prometheus        # tests/test_monitoring_assets.py: promtool check rules / test rules / check metrics
    sip-tester        # tests/test_siprec_sipp.py: sipp (3.6.1) plays SIPREC calls from tests/sipp/*.xml
    openssl           # tests/test_siprec_serve.py: a self-signed certificate for SIP over TLS
)

if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
    echo "install-system-deps: this script needs apt-get (Debian/Ubuntu); install these" \
        "packages by hand: ${PACKAGES[*]}" >&2
    exit 1
fi

installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == "installed" ]]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done

if ((${#missing[@]} == 0)); then
    echo "install-system-deps: all present (${PACKAGES[*]})"
    exit 0
fi

SUDO=()
if ((EUID != 0)); then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "install-system-deps: not root and no sudo; run as root to install: ${missing[*]}" >&2
        exit 1
    fi
    SUDO=(sudo)
fi

echo "install-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}"
