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
sum=$(cat "$in"/*.whl | sha256sum | cut -c1-64)
if [ "$(cat /var/lib/edgetest/wheel 2>/dev/null || true)" != "$sum" ]; then
    # Pure-Python wheels install by unpacking them into site-packages (what pip does for
    # them, without pip's own start-up, which takes minutes under TCG), replacing what the
    # image had of the same packages; then edgeagent's console script.
    /opt/edgeagent/bin/python3 - "$in"/*.whl <<'PY'
import compileall, shutil, sys, sysconfig, zipfile
from pathlib import Path
site = Path(sysconfig.get_paths()["purelib"])
for path in sys.argv[1:]:
    with zipfile.ZipFile(path) as wheel:
        tops = {name.split("/")[0] for name in wheel.namelist()}
        dist = next(t for t in tops if t.endswith(".dist-info")).split("-")[0]
        for old in [*(site / t for t in tops), *site.glob(f"{dist}-*.dist-info")]:
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
        wheel.extractall(site)
    for top in tops:
        if (site / top).is_dir() and not top.endswith(".dist-info"):
            compileall.compile_dir(site / top, quiet=1)
script = Path(sys.prefix) / "bin/edgeagent"
script.write_text(f"#!{sys.prefix}/bin/python3\nimport sys\nfrom edgeagent.cli import main\nsys.exit(main())\n")
script.chmod(0o755)
PY
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
    echo "EDGE: installed $(cd "$in" && ls *.whl | tr "\n" " ")uptime=$(cut -d' ' -f1 /proc/uptime)"
    if [ "$scenario" = clock ]; then
        # A device without RTC: the agent starts with the clock in 1970.
        date -s @86400 >/dev/null
        echo "EDGE: clock at 1970 before the agent starts"
    fi
    # This boot's transaction was computed before the unit existed.
    systemctl start --no-block edgeagent.service
fi
