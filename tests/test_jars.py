"""Jar resolution: pinned versions, overrides keyed in the cache, progress, and errors that say
what failed, where, and which setting picks another version.

The error tests run the real Maven against the real repository (a version that does not exist
answers 404 quickly) or against a closed loopback port; the rest use a stand-in ``mvn``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from stormline.deploy import jars
from stormline.deploy.errors import StackError
from stormline.deploy.jars import MAVEN_CENTRAL, JarResolver, pom_versions
from stormline.settings import Settings
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty cache (so an empty Maven repository) shared by this module's real-Maven tests."""
    return tmp_path_factory.mktemp("jars-cache")


# ------------------------------------------------------------ real Maven, real repo --
@pytest.mark.slow
def test_apicurio_version_that_does_not_exist_names_artifact_repo_and_setting(
    real_cache: Path,
) -> None:
    resolver = JarResolver(real_cache, apicurio_version="3.3.99")
    with pytest.raises(StackError) as err:
        resolver.apicurio_dir()
    msg = _flat(str(err.value))
    assert "io.apicurio:apicurio-registry-app 3.3.99" in msg
    assert MAVEN_CENTRAL in msg
    assert "reachable, but it does not serve this version" in msg
    assert "apicurio-registry-app-3.3.99.pom answered 404" in msg
    assert "STORMLINE_APICURIO_VERSION" in msg and "STORMLINE_MAVEN_MIRROR_URL" in msg
    assert f"the pin {pom_versions()['apicurio.version']}" in msg
    assert "Maven said:" in msg
    assert not (real_cache / "apicurio-registry-3.3.99").exists()


@pytest.mark.slow
def test_cli_exits_1_for_a_kafka_version_that_does_not_exist(real_cache: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORMLINE_")}
    env["STORMLINE_KAFKA_VERSION"] = "4.1.99"
    out = subprocess.run(
        [sys.executable, "-m", "stormline.deploy.jars", "--cache-dir", str(real_cache)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    msg = _flat(out.stderr)
    assert "org.apache.kafka:kafka_2.13 4.1.99" in msg
    assert "does not serve this version" in msg
    assert "STORMLINE_KAFKA_VERSION" in msg
    assert "Apache Kafka 4.1.99: resolving with Maven" in out.stdout  # progress went to stdout


def test_unreachable_repository_on_a_fresh_cache_fails_before_maven(tmp_path: Path) -> None:
    mirror = f"http://127.0.0.1:{free_port()}/maven2"
    with pytest.raises(StackError) as err:
        JarResolver(tmp_path / "cache", mirror).resolve()
    msg = _flat(str(err.value))
    assert f"the Maven repository {mirror} is unreachable" in msg
    assert f"org.apache.kafka:kafka_2.13 {pom_versions()['kafka.version']}" in msg
    assert "STORMLINE_MAVEN_MIRROR_URL" in msg


def test_unreachable_repository_after_maven_failed_says_so(tmp_path: Path) -> None:
    """A non-empty local repository: Maven runs (it might have had everything), fails, and
    the probe afterwards explains why."""
    cache = tmp_path / "cache"
    (cache / "m2").mkdir(parents=True)
    (cache / "m2" / "something").write_text("")
    mirror = f"http://127.0.0.1:{free_port()}/maven2"
    with pytest.raises(StackError) as err:
        JarResolver(cache, mirror, apicurio_version="3.3.3").apicurio_dir()
    msg = _flat(str(err.value))
    assert "Could not resolve io.apicurio:apicurio-registry-app 3.3.3" in msg
    assert f"from the Maven repository {mirror}" in msg
    assert "unreachable from this machine" in msg
    assert "STORMLINE_MAVEN_MIRROR_URL" in msg
    assert "Maven said:" in msg and "Connection refused" in msg


# ------------------------------------------------------------------ stand-in mvn --
FAKE_MVN = """#!/usr/bin/env bash
echo "$@" >> "$FAKE_MVN_LOG"
repo=""; out=""
for a in "$@"; do
  case "$a" in
    -Dmaven.repo.local=*) repo="${a#*=}" ;;
    -Dmdep.outputFile=*) out="${a#*=}" ;;
  esac
done
mkdir -p "$repo/org/x"
for i in 1 2 3; do
  echo "[INFO] Downloading from central: https://repo.example/org/x/x-$i.jar"
  head -c 200000 /dev/zero > "$repo/org/x/x-$i.jar"
  sleep 0.3
  echo "[INFO] Downloaded from central: https://repo.example/org/x/x-$i.jar (200 kB at 1 MB/s)"
done
if [ -n "$out" ]; then printf '%s' "$repo/org/x/x-1.jar:$repo/org/x/x-2.jar" > "$out"; fi
"""


@pytest.fixture
def fake_mvn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    mvn = bindir / "mvn"
    mvn.write_text(FAKE_MVN)
    mvn.chmod(0o755)
    log = tmp_path / "mvn.log"
    log.write_text("")
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MVN_LOG", str(log))
    monkeypatch.setattr(jars, "PROGRESS_EVERY_S", 0.2)
    return log


def _warm_cache(tmp_path: Path) -> Path:
    """A cache whose Maven repository is not empty, so no reachability probe runs first."""
    cache = tmp_path / "cache"
    (cache / "m2").mkdir(parents=True)
    (cache / "m2" / "seed").write_text("")
    return cache


def test_kafka_override_goes_to_maven_and_keys_the_cache(tmp_path: Path, fake_mvn: Path) -> None:
    said: list[str] = []
    cache = _warm_cache(tmp_path)
    resolver = JarResolver(cache, kafka_version="4.0.0", report=said.append)
    cp = resolver.kafka_classpath()
    assert cp.endswith("x-2.jar")
    assert (cache / "kafka-4.0.0.classpath").read_text() == cp
    args = fake_mvn.read_text()
    assert "-Dkafka.version=4.0.0" in args and "build-classpath" in args
    assert "-B" in args.split() and "-q" not in args.split()
    # Progress while Maven runs, then a summary with files and bytes.
    assert any("Apache Kafka 4.0.0:" in m and "files," in m and "downloaded" in m for m in said)
    assert "Apache Kafka 4.0.0: fetched 3 files, 0.6 MB" in said[-1]
    assert resolver.fetches[0].files == 3 and resolver.fetches[0].bytes >= 600_000
    # Cached: a second resolver never runs Maven.
    calls = fake_mvn.read_text().count("\n")
    assert JarResolver(cache, kafka_version="4.0.0").kafka_classpath() == cp
    assert fake_mvn.read_text().count("\n") == calls


def test_apicurio_fast_jar_is_unpacked_per_version(tmp_path: Path, fake_mvn: Path) -> None:
    cache = _warm_cache(tmp_path)
    version = "3.3.1"
    # What Maven would leave in the repository: the Quarkus fast-jar archive.
    src = tmp_path / "src"
    for rel in ("quarkus-run.jar", "lib/main/a.jar", "app/app.jar", "quarkus/q.dat"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    archive = (
        cache / "m2/io/apicurio/apicurio-registry-app" / version
    ) / f"apicurio-registry-app-{version}-all.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        for child in src.iterdir():
            tar.add(child, arcname=child.name)
    settings = Settings(cache_dir=cache, apicurio_version=version, kafka_version="4.0.0")
    resolver = JarResolver.from_settings(settings)
    assert resolver.apicurio.version == version and resolver.kafka.version == "4.0.0"
    assert resolver.missing() == ["Apache Kafka 4.0.0", f"Apicurio Registry {version}"]
    got = resolver.resolve()
    assert resolver.missing() == []
    assert got.apicurio_version == version
    assert got.apicurio_dir == cache / f"apicurio-registry-{version}"
    assert got.apicurio_jar == got.apicurio_dir / "quarkus-run.jar" and got.apicurio_jar.is_file()
    assert (got.apicurio_dir / "lib/main/a.jar").is_file()
    assert f"io.apicurio:apicurio-registry-app:{version}:tar.gz:all" in fake_mvn.read_text()


def test_default_versions_are_the_pom_pins(tmp_path: Path) -> None:
    pins = pom_versions()
    resolver = JarResolver(tmp_path)
    assert resolver.kafka.version == pins["kafka.version"]
    assert resolver.apicurio.version == pins["apicurio.version"]
    assert pins["apicurio.version"].startswith("3.3.")
