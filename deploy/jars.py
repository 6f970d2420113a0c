"""Fetch the embedded stack's JVM parts from Maven Central, once, into the cache directory.

Versions live in ``deploy/kafka/pom.xml`` and nowhere else. The first run asks Maven for
Kafka's classpath (Kafka plus the log4j2 backend its POM leaves out) and for the Apicurio
registry archive; later runs find both in the cache and start without Maven.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from deploy.errors import StackError

POM = Path(__file__).parent / "kafka" / "pom.xml"
_NS = {"m": "http://maven.apache.org/POM/4.0.0"}
MAVEN_CENTRAL = "https://repo.maven.apache.org/maven2"
# Pinned so that every machine runs the same goals.
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"


def pom_versions() -> dict[str, str]:
    props = ET.parse(POM).getroot().find("m:properties", _NS)
    assert props is not None
    return {el.tag.split("}")[1]: (el.text or "").strip() for el in props}


@dataclass(frozen=True)
class Jars:
    kafka_version: str
    kafka_classpath: str
    apicurio_version: str
    apicurio_dir: Path

    @property
    def apicurio_jar(self) -> Path:
        return self.apicurio_dir / f"apicurio-registry-app-{self.apicurio_version}-runner.jar"


class JarResolver:
    def __init__(self, cache_dir: Path, mirror_url: str | None = None) -> None:
        self.cache_dir = cache_dir
        self.repo = cache_dir / "m2"
        self.mirror_url = mirror_url
        self.versions = pom_versions()

    def resolve(self) -> Jars:
        kv, av = self.versions["kafka.version"], self.versions["apicurio.version"]
        return Jars(kv, self._kafka_classpath(kv), av, self._apicurio(av))

    # -- Kafka --------------------------------------------------------------------------
    def _kafka_classpath(self, version: str) -> str:
        cp_file = self.cache_dir / f"kafka-{version}.classpath"
        if cp_file.exists():
            cp = cp_file.read_text().strip()
            if cp and all(Path(p).exists() for p in cp.split(":")):
                return cp
        tmp = cp_file.with_suffix(".tmp")
        self._mvn(
            ["-f", str(POM), f"{DEPENDENCY_PLUGIN}:build-classpath", f"-Dmdep.outputFile={tmp}"],
            what=f"Apache Kafka {version}",
        )
        tmp.replace(cp_file)
        return cp_file.read_text().strip()

    # -- Apicurio -----------------------------------------------------------------------
    def _apicurio(self, version: str) -> Path:
        target = self.cache_dir / f"apicurio-registry-{version}"
        jar = target / f"apicurio-registry-app-{version}-runner.jar"
        if jar.exists():
            return target
        coords = f"io.apicurio:apicurio-registry-app:{version}:tar.gz:all"
        self._mvn(
            [f"{DEPENDENCY_PLUGIN}:get", "-Dtransitive=false", f"-Dartifact={coords}"],
            what=f"Apicurio Registry {version}",
        )
        archive = (
            self.repo
            / "io/apicurio/apicurio-registry-app"
            / version
            / f"apicurio-registry-app-{version}-all.tar.gz"
        )
        tmp = target.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        tmp.replace(target)
        return target

    # -- Maven --------------------------------------------------------------------------
    def _mvn(self, args: list[str], *, what: str) -> None:
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError(
                f"Maven is needed once to fetch {what} from Maven Central, and `mvn` is not on "
                "PATH. Install it: apt-get install -y maven"
            )
        self._require_reachable(what)
        self.repo.mkdir(parents=True, exist_ok=True)
        cmd = [mvn, "-B", "-q", f"-Dmaven.repo.local={self.repo}"]
        if self.mirror_url:
            cmd += ["-s", str(self._mirror_settings())]
        proc = subprocess.run(cmd + args, capture_output=True, text=True)
        if proc.returncode == 0:
            return
        raise StackError(f"Maven failed to fetch {what}:\n{_last_error(proc.stdout + proc.stderr)}")

    def _require_reachable(self, what: str) -> None:
        """Maven's own message for a dead network is a riddle; ask the repository first."""
        import httpx

        url = self.mirror_url or MAVEN_CENTRAL
        try:
            httpx.head(url.rstrip("/") + "/", timeout=15, follow_redirects=True)
        except httpx.HTTPError as exc:
            raise StackError(
                f"Could not download {what}: the Maven repository {url} is unreachable from "
                f"this machine ({type(exc).__name__}: {exc}). Check the network or proxy, or set "
                "STORMLINE_MAVEN_MIRROR_URL to a reachable mirror. Once fetched, the jars stay "
                f"cached in {self.repo}."
            ) from exc

    def _mirror_settings(self) -> Path:
        path = self.cache_dir / "maven-mirror-settings.xml"
        path.write_text(
            "<settings><mirrors><mirror><id>stormline-mirror</id><mirrorOf>*</mirrorOf>"
            f"<url>{self.mirror_url}</url></mirror></mirrors></settings>\n"
        )
        return path


def _last_error(out: str) -> str:
    errors = [line for line in out.splitlines() if "ERROR" in line]
    return "\n".join((errors or out.splitlines())[:6])
