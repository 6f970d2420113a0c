#!/usr/bin/env bash
# Installs the system packages the embedded stack needs, only when missing:
# Java 17+ (Kafka, Apicurio), Maven (fetches their jars once), redis-server.
set -euo pipefail
need=()
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need+=(maven)
command -v redis-server >/dev/null || need+=(redis-server)
python3 -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null || {
  echo "Stormline needs Python 3.11 as python3 (found: $(python3 --version 2>&1))." >&2; exit 1; }
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
