#!/bin/sh
# Started by the image's edgetest.service once the agent's unit was started.
scenario=$(sed -n 's/.*edgetest=\([^ ]*\).*/\1/p' /proc/cmdline)
exec /usr/bin/python3 -u /run/edgetest/edgetest.py "$scenario"
