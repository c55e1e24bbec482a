#!/bin/sh
# Runs on every boot of a test guest, before edgeagent.service (from the
# image's edgetest-setup.service), with this run's input disk unpacked in
# /run/edgetest. On the first boot of a run it installs edgeagent the way a
# device image has it: the wheel of the checkout into the image's venv
# (its dependencies are already there), the config, the service unit.
set -eu
in=/run/edgetest
scenario=$(sed -n 's/.*edgetest=\([^ ]*\).*/\1/p' /proc/cmdline)
mkdir -p /var/lib/edgetest /var/log/edgetest /etc/edgeagent
boots=$(( $(cat /var/lib/edgetest/boots 2>/dev/null || echo 0) + 1 ))
echo "$boots" >/var/lib/edgetest/boots
echo "EDGE: setup boot=$boots scenario=$scenario boot_id=$(cat /proc/sys/kernel/random/boot_id) uptime=$(cut -d' ' -f1 /proc/uptime)"
wheel=$(ls "$in"/edgeagent-*.whl)
sum=$(sha256sum "$wheel" | cut -c1-64)
if [ "$(cat /var/lib/edgetest/wheel 2>/dev/null || true)" != "$sum" ]; then
    /opt/edgeagent/bin/pip install -q --disable-pip-version-check --no-index --no-deps --force-reinstall "$wheel"
    install -m 644 "$in/edgeagent.toml" /etc/edgeagent/edgeagent.toml
    install -m 644 "$in/edgeagent.service" /etc/systemd/system/edgeagent.service
    ln -sf /opt/edgeagent/bin/edgeagent /usr/bin/edgeagent   # where a package puts it (packaging/'s unit)
    if grep -q '^User=edgeagent' "$in/edgeagent.service" && ! id edgeagent >/dev/null 2>&1; then
        useradd --system --no-create-home --home-dir /var/lib/edgeagent --shell /usr/sbin/nologin edgeagent
    fi
    systemctl daemon-reload
    systemctl enable edgeagent.service 2>/dev/null
    echo "$sum" >/var/lib/edgetest/wheel
    sync
    echo "EDGE: installed $(basename "$wheel") uptime=$(cut -d' ' -f1 /proc/uptime)"
    if [ "$scenario" = clock ]; then
        # A device without RTC: the agent starts with the clock in 1970.
        date -s @86400 >/dev/null
        echo "EDGE: clock set to 1970"
    fi
    # This boot's transaction was computed before the unit existed.
    systemctl start --no-block edgeagent.service
fi
