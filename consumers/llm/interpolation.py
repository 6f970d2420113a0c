"""``${NAME}`` interpolation of the agent registry's string values.

``${NAME}`` and ``${NAME:-default}`` in any string value are replaced when the
registry is loaded. ``STORMLINE_*`` names that are settings come from the effective
:class:`~stormline.settings.Settings` (CLI flag, environment, ``.env``, default), so
``base_url: http://127.0.0.1:${STORMLINE_SIMULATOR_PORT}/v1`` follows the simulator's port;
other names come from the environment. ``:-default`` applies when the variable is unset or
empty; ``$${`` is a literal ``${``. An unknown variable without a default is an error naming
the variable, the agent and the file. Secrets are never interpolated (names such as
``*_API_KEY``, ``*_TOKEN``, ``*_PASSWORD`` and secret settings are refused): values of this
file end up in logs and events, keys are referenced by ``api_key_env`` instead.

:class:`Variables` resolves names (settings built lazily, only when a ``STORMLINE_*`` setting
is referenced); :func:`interpolate` walks a YAML document. Errors are
:class:`InterpolationError`; :func:`~consumers.llm.agents.parse_registry` reports them with the
registry's other problems.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from enum import Enum
from typing import TYPE_CHECKING, Any, get_args

from pydantic import SecretStr

if TYPE_CHECKING:
    from stormline.settings import Settings


class InterpolationError(ValueError):
    """A reference that cannot be resolved (unset, malformed, or a secret); names the place."""


# `$${` (a literal `${`) or `${...}`; an unclosed `${` matches with an empty "close".
_REF = re.compile(r"\$\$\{|\$\{(?P<body>[^}]*)(?P<close>\}?)")
_BODY = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?", re.DOTALL)
_SECRET_WORDS = {"KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIALS"}
SETTINGS_PREFIX = "STORMLINE_"


def _is_secret_name(name: str) -> bool:
    return bool(_SECRET_WORDS & set(name.upper().split("_")))


def _setting_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


class Variables:
    """Looks variables up: settings for STORMLINE_* fields (built lazily), else the environment."""

    def __init__(self, settings: Settings | None, environ: Mapping[str, str] | None) -> None:
        self._settings = settings
        self._environ = os.environ if environ is None else environ

    def settings(self) -> Settings:
        if self._settings is None:
            from stormline.settings import Settings

            self._settings = Settings()
        return self._settings

    def get(self, name: str) -> str | None:
        if name.startswith(SETTINGS_PREFIX):
            from stormline.settings import Settings

            field = name[len(SETTINGS_PREFIX) :].lower()
            if field in Settings.model_fields:
                value = getattr(self.settings(), field)
                return None if value is None else _setting_text(value)
        return self._environ.get(name)

    def is_secret_setting(self, name: str) -> bool:
        if not name.startswith(SETTINGS_PREFIX):
            return False
        from stormline.settings import Settings

        info = Settings.model_fields.get(name[len(SETTINGS_PREFIX) :].lower())
        if info is None:
            return False
        return info.annotation is SecretStr or SecretStr in get_args(info.annotation)

    def interpolate(self, value: Any, where: str) -> Any:
        """``value`` with every reference in its strings replaced; ``where`` names the place."""
        return _interpolate(value, self, where)


def _interpolate_text(text: str, variables: Variables, where: str) -> str:
    def replace(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        body = m.group("body")
        if not m.group("close"):
            raise InterpolationError(
                f"{where}: unclosed '${{' in {text!r}; write $${{ for a literal '${{'"
            )
        ref = _BODY.fullmatch(body)
        if ref is None:
            raise InterpolationError(
                f"{where}: invalid reference '${{{body}}}'; use ${{NAME}} or ${{NAME:-default}} "
                "(NAME: letters, digits, underscores), or $${ for a literal '${'"
            )
        name, default = ref.group("name"), ref.group("default")
        if _is_secret_name(name) or variables.is_secret_setting(name):
            raise InterpolationError(
                f"{where}: ${{{name}}} looks like a secret; secrets are never interpolated "
                "into the agent registry (its values are logged): name the variable in "
                "api_key_env instead"
            )
        value = variables.get(name)
        if value:
            return value
        if default is not None:
            return default
        if value is not None:
            return value  # set but empty, and no default: empty, as in a shell
        raise InterpolationError(
            f"{where}: ${{{name}}} is not set: export {name}, or give a default "
            f"with ${{{name}:-value}}"
        )

    return _REF.sub(replace, text)


def _interpolate(value: Any, variables: Variables, where: str) -> Any:
    if isinstance(value, str):
        return _interpolate_text(value, variables, where) if "${" in value else value
    if isinstance(value, dict):
        return {k: _interpolate(v, variables, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, variables, where) for v in value]
    return value


def interpolate(
    data: Any,
    *,
    settings: Settings | None = None,
    environ: Mapping[str, str] | None = None,
    where: str = "<memory>",
) -> Any:
    """``data`` with ``${NAME}`` / ``${NAME:-default}`` replaced in every string value.

    ``STORMLINE_*`` names that are settings come from ``settings`` (default: ``Settings()``,
    i.e. environment, ``.env`` and defaults), others from ``environ`` (default: the process
    environment). Raises :class:`InterpolationError` naming ``where`` and the variable.
    """
    return _interpolate(data, Variables(settings, environ), where)
