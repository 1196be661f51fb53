"""Settings: every option is declared once with its flags, environment variable and default.

A process builds one settings object from flags and the environment; flags override the
environment, which overrides the default. ``--help`` shows each option's environment name.
Secrets are :class:`Secret` values whose ``repr``/``str`` are redacted, so settings can be logged.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Final

from runtime.errors import ConfigError
from runtime.process.memory import DEFAULT_INTERVAL as DEFAULT_TRIM_INTERVAL


class Secret:
    """A string that never prints itself (flags, env, logs, reprs show ``**********``)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        """Return the secret value (only where it is handed to a client library)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********"

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Opt:
    """One command-line option bound to an environment variable.

    Args:
        flags: the option strings (``("--num-records", "-n")``).
        dest: attribute name in the parsed namespace.
        env: environment variable that supplies the default, or None.
        default: value when neither flag nor env is given.
        help: help text; the env name is appended automatically.
        type: converter from string (applied to env values too).
        action: argparse action (``store_true``, ``append``, ...).
        choices: allowed values.
        metavar: argparse metavar.
        separator: how an ``append`` option's env value splits into items (a regex; default ``,``).
    """

    flags: tuple[str, ...]
    dest: str
    env: str | None = None
    default: Any = None
    help: str = ""
    type: Callable[[str], Any] | None = None
    action: str | None = None
    choices: Sequence[Any] | None = None
    metavar: str | None = None
    separator: str = ","


_TRUE: Final = frozenset({"1", "true", "yes", "on", "y", "t"})
_FALSE: Final = frozenset({"0", "false", "no", "off", "n", "f", ""})


def parse_bool(value: str) -> bool:
    """Parse an environment boolean (``1/true/yes/on`` or ``0/false/no/off``)."""
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"not a boolean: {value!r}")


def parse_secret(value: str) -> Secret:
    """Wrap a flag/env value as a :class:`Secret`."""
    return Secret(value)


def env_default(opt: Opt, environ: Mapping[str, str]) -> Any:
    if opt.env is None or opt.env not in environ:
        return opt.default
    raw = environ[opt.env]
    try:
        if opt.action in ("store_true", "store_false"):
            return parse_bool(raw)
        if opt.action == "append":
            conv = opt.type or str
            return [conv(part.strip()) for part in re.split(opt.separator, raw) if part.strip()]
        return (opt.type or str)(raw)
    except (ValueError, ConfigError) as e:
        raise ConfigError(f"environment variable {opt.env}={raw!r}: {e}") from e


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    opts: Sequence[Opt],
    environ: Mapping[str, str] | None = None,
) -> None:
    """Add ``opts`` to ``parser`` with env-derived defaults and the env name in the help."""
    env = os.environ if environ is None else environ
    for opt in opts:
        default = env_default(opt, env)
        text = opt.help
        if opt.env:
            text = f"{text} [env: {opt.env}]" if text else f"[env: {opt.env}]"
        if opt.default not in (None, False, []) and opt.action not in ("store_true",):
            shown = "**********" if isinstance(opt.default, Secret) else opt.default
            text += f" (default: {shown})"
        kwargs: dict[str, Any] = {"dest": opt.dest, "help": text.replace("%", "%%")}
        if opt.action in ("store_true", "store_false"):
            kwargs["action"] = opt.action
            kwargs["default"] = bool(default)
        elif opt.action == "append":
            kwargs["action"] = "append"
            # argparse appends to a default list; start from None, resolve_appends() fills env/default.
            kwargs["default"] = None
            if opt.type:
                kwargs["type"] = opt.type
            if opt.metavar:
                kwargs["metavar"] = opt.metavar
        else:
            kwargs["default"] = default
            if opt.type:
                kwargs["type"] = opt.type
            if opt.choices is not None:
                kwargs["choices"] = opt.choices
            if opt.metavar:
                kwargs["metavar"] = opt.metavar
        parser.add_argument(*opt.flags, **kwargs)


def resolve_appends(ns: argparse.Namespace, opts: Sequence[Opt], environ: Mapping[str, str] | None = None) -> None:
    """Fill append-options that were not given on the command line from env or default."""
    env = os.environ if environ is None else environ
    for opt in opts:
        if opt.action == "append" and getattr(ns, opt.dest, None) is None:
            value = env_default(opt, env)
            setattr(ns, opt.dest, list(value) if value is not None else [])


def redacted(obj: Any) -> dict[str, Any]:
    """A loggable dict of a settings dataclass with secrets (and URLs' passwords) redacted."""
    out: dict[str, Any] = {}
    if not is_dataclass(obj):
        raise TypeError("redacted() expects a settings dataclass")
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            out[f.name] = redacted(value)
        elif isinstance(value, Secret):
            out[f.name] = str(value)
        elif isinstance(value, str) and "://" in value and "@" in value:
            out[f.name] = redact_url(value)
        elif isinstance(value, dict):
            out[f.name] = {k: redact_value(k.replace(".", "_"), v) for k, v in value.items()}
        else:
            out[f.name] = value
    return out


def redact_url(url: str) -> str:
    """Hide the password of ``scheme://user:password@host/...``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    cred, _, host = rest.rpartition("@")
    user = cred.split(":", 1)[0]
    return f"{scheme}://{user}:**********@{host}"


_SECRET_WORDS: Final = frozenset({"password", "passwd", "secret", "token", "auth", "credential", "credentials"})
_DSN_PASSWORD: Final = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)


def redact_value(name: str, value: Any) -> Any:
    """``value`` as it may be logged: secrets, URL and DSN passwords, and secret-named strings hidden."""
    if isinstance(value, Secret):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [redact_value(name, v) for v in value]
    if name == "kafka_config" and isinstance(value, str) and "=" in value:
        key, _, setting = value.partition("=")
        return f"{key}={redact_value(key.replace('.', '_'), setting)}"
    if isinstance(value, str):
        if value and _SECRET_WORDS.intersection(name.lower().split("_")):
            return "**********"
        if "://" in value and "@" in value:
            value = redact_url(value)
        return _DSN_PASSWORD.sub(r"\1**********", value)
    return value


def redacted_namespace(ns: argparse.Namespace) -> dict[str, Any]:
    """A loggable dict of parsed options (internal entries such as the subcommand's function left out)."""
    return {k: redact_value(k, v) for k, v in sorted(vars(ns).items())
            if not k.startswith("_") and not callable(v)}


# --------------------------------------------------------------------------------------------
# Observability options shared by every process.

def log_level_option(default: str = "INFO") -> Opt:
    """``--log-level`` / ``BACKFILL_LOG_LEVEL``, with the default the command wants."""
    return Opt(("--log-level",), "log_level", "BACKFILL_LOG_LEVEL", default, "logging level",
               choices=("DEBUG", "INFO", "WARNING", "ERROR"))


OBSERVABILITY_OPTIONS: Final[tuple[Opt, ...]] = (
    Opt(("--metrics-port",), "metrics_port", "BACKFILL_METRICS_PORT", 0,
        "serve Prometheus metrics, /healthz and /readyz on this port (0 = off)", type=int),
    Opt(("--metrics-host",), "metrics_host", "BACKFILL_METRICS_HOST", "0.0.0.0",  # noqa: S104 - pods are scraped from outside
        "address the metrics server binds"),
    log_level_option(),
    Opt(("--log-format",), "log_format", "BACKFILL_LOG_FORMAT", "text", "log line format",
        choices=("text", "json")),
    Opt(("--heap-trim-interval",), "heap_trim_interval", "BACKFILL_HEAP_TRIM_INTERVAL", DEFAULT_TRIM_INTERVAL,
        "give the heap's freed memory back to the system every this many seconds (glibc; 0 = never): "
        "keeps the resident size near what is in use after a burst", type=float),
)


@dataclass(frozen=True)
class ObservabilitySettings:
    """Metrics endpoint and logging."""

    metrics_port: int = 0
    metrics_host: str = "0.0.0.0"  # noqa: S104 - see OBSERVABILITY_OPTIONS
    log_level: str = "INFO"
    log_format: str = "text"
    heap_trim_interval: float = DEFAULT_TRIM_INTERVAL

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> ObservabilitySettings:
        """Build from a namespace parsed with :data:`OBSERVABILITY_OPTIONS`."""
        return cls(**{o.dest: getattr(ns, o.dest) for o in OBSERVABILITY_OPTIONS})
