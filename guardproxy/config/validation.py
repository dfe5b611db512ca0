"""Reading untrusted YAML into typed values, with errors that name the exact field.

Used by ``config`` (and by the ServiceTitan settings): a ``Fields`` wraps one mapping of the file,
hands out typed values by key, and at the end rejects any key nobody asked for, so a typo in
``proxy.yaml`` is an error at start-up instead of a silently ignored setting.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """A configuration value is wrong; ``path`` is the dotted field name (``models.gpt-4o.input``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


def expand_env(value: Any, env: Mapping[str, str], path: str = "") -> Any:
    """Expand ``${VAR}`` / ``${VAR:-default}`` in every string value of a parsed YAML tree.

    ``$$`` stands for a literal ``$``. A ``${VAR}`` whose variable is unset is an error, so that a
    forgotten secret fails at start-up rather than sending an empty key upstream.
    """
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(
                path, f"environment variable {name} is not set (write ${{{name}:-}} to allow it to be empty)"
            )

        return _ENV_REF.sub(substitute, value)
    if isinstance(value, Mapping):
        return {k: expand_env(v, env, join(path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """Typed access to one mapping of the config; ``done()`` rejects keys that were never read."""

    def __init__(self, raw: Any, path: str) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(path, f"must be a mapping, got {describe(raw)}")
        for key in raw:
            if not isinstance(key, str):
                # YAML reads an unquoted `1234:` (a ServiceTitan id, say) as a number.
                raise ConfigError(join(path, str(key)), f"keys must be strings: write it quoted, \"{key}\":")
        self.raw: Mapping[str, Any] = raw
        self.path = path
        self._seen: set[str] = set()

    def at(self, key: str) -> str:
        return join(self.path, key)

    def has(self, key: str) -> bool:
        return key in self.raw

    def get(self, key: str, default: Any = None) -> Any:
        self._seen.add(key)
        return self.raw.get(key, default)

    def section(self, key: str) -> Fields:
        return Fields(self.get(key), self.at(key))

    def text(self, key: str, default: str, *, choices: tuple[str, ...] = (), allow_empty: bool = True) -> str:
        value = self.get(key, default)
        if value is None:
            value = default
        if not isinstance(value, str):
            raise ConfigError(self.at(key), f"must be a string, got {describe(value)}")
        if choices and value not in choices:
            raise ConfigError(self.at(key), f"must be one of {', '.join(choices)}; got {describe(value)}")
        if not allow_empty and not value:
            raise ConfigError(self.at(key), "must not be empty")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(self.at(key), f"must be true or false, got {describe(value)}")
        return value

    def optional_str(self, key: str) -> str | None:
        value = self.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigError(self.at(key), f"must be a string, got {describe(value)}")
        return value or None

    def integer(self, key: str, default: int, *, min_value: int | None = None, max_value: int | None = None) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.at(key), f"must be a whole number, got {describe(value)}")
        check_range(self.at(key), value, min_value, max_value)
        return value

    def decimal(
        self, key: str, default: Decimal | None, *, min_value: Decimal | None = None,
        max_value: Decimal | None = None,
    ) -> Decimal:
        value = self.get(key, default)
        if value is None:
            raise ConfigError(self.at(key), "is required")
        number = to_decimal(self.at(key), value)
        check_range(self.at(key), number, min_value, max_value)
        return number

    def text_list(self, key: str) -> list[str]:
        value = self.get(key, [])
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(self.at(key), f"must be a list of strings, got {describe(value)}")
        return list(value)

    def text_map(self, key: str) -> dict[str, str]:
        section = self.get(key, {})
        if section is None:
            return {}
        if not isinstance(section, Mapping):
            raise ConfigError(self.at(key), f"must be a mapping, got {describe(section)}")
        out: dict[str, str] = {}
        for k, v in section.items():
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                raise ConfigError(join(self.at(key), str(k)), f"must be a string, got {describe(v)}")
            out[str(k)] = str(v)
        return out

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self._seen)
        if unknown:
            known = ", ".join(sorted(self._seen)) or "none"
            raise ConfigError(self.at(unknown[0]), f"unknown field (known fields here: {known})")


def to_decimal(path: str, value: Any) -> Decimal:
    """A YAML number (or numeric string) as an exact Decimal: ``0.8`` is 8/10, not a binary float."""
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(path, f"must be a number, got {describe(value)}")
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise ConfigError(path, f"must be a number, got {describe(value)}") from None
    if not number.is_finite():
        raise ConfigError(path, f"must be a finite number, got {describe(value)}")
    return number


def check_range(path: str, value: Any, min_value: Any, max_value: Any) -> None:
    if min_value is not None and value < min_value:
        raise ConfigError(path, f"must be at least {min_value}, got {value}")
    if max_value is not None and value > max_value:
        raise ConfigError(path, f"must be at most {max_value}, got {value}")
