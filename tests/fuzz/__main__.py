"""``python -m tests.fuzz <target|all> --seconds N``: run the fuzz targets under atheris (libFuzzer).

Each target runs in its own process (libFuzzer exits when it stops), coverage-guided over the
project's own modules, seeded from :mod:`tests.fuzz.targets`. The summary gives, per target, the
inputs executed and the crashes found; a crashing input is written to the artifacts directory
(``crash-*``, ``timeout-*``, ``oom-*``), to become a regression test. libFuzzer stops a target at
its first crash.

``--list`` names the targets. ``--corpus DIR`` keeps each target's corpus in ``DIR/<target>``
between runs (default: a temporary one). Needs ``atheris`` (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

_ROOT: Final = Path(__file__).resolve().parents[2]
#: The packages whose code is instrumented for coverage (the decoders and what they call).
_INSTRUMENTED: Final = ("runtime", "producers", "consumers", "schemas", "tests.fuzz")
_EXECUTED: Final = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_RATE: Final = re.compile(r"stat::average_exec_per_sec:\s*(\d+)")
_ARTIFACT: Final = re.compile(r"(?:Test unit|input) written to (\S+)")


@dataclass
class Result:
    """What one target's run did."""

    target: str
    executions: int = 0
    per_second: int = 0
    seconds: float = 0.0
    returncode: int = 0
    artifacts: list[str] = field(default_factory=list)
    log_path: str = ""

    @property
    def crashes(self) -> int:
        """Crashing (or hanging, or memory-exhausting) inputs found."""
        return len(self.artifacts) or (1 if self.returncode not in (0,) else 0)


def _worker(name: str, libfuzzer_args: list[str]) -> None:
    """Fuzz one target in this process (never returns: libFuzzer exits)."""
    # imported here: the project's modules must be imported first inside instrument_imports()
    import random

    import atheris

    with atheris.instrument_imports(include=list(_INSTRUMENTED)):
        from tests.fuzz.mutate import Mutator
        from tests.fuzz.targets import TARGETS

    target = TARGETS[name]
    corpus = [a for a in libfuzzer_args if not a.startswith("-")]
    seeds = target.seeds()
    if corpus and not any(Path(corpus[0]).iterdir()):
        for i, seed in enumerate(seeds):
            (Path(corpus[0]) / f"seed-{i:04d}").write_bytes(seed)

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if target.structure is not None and rng.random() < 0.3:
            out = Mutator(rng).structured(data, target.structure)
            if out is not None and len(out) <= max_size:
                return out
        mutated: bytes = atheris.Mutate(data, max_size)
        return mutated

    atheris.Setup([sys.argv[0], *libfuzzer_args], target.run, custom_mutator=mutate)
    atheris.Fuzz()


def _run_target(name: str, seconds: int, corpus_root: Path, artifacts: Path, max_len: int) -> Result:
    corpus = corpus_root / name
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    log_path = artifacts / f"{name}.log"
    cmd = [sys.executable, "-m", "tests.fuzz", "--worker", name, "--", str(corpus),
           f"-max_total_time={seconds}", "-print_final_stats=1", f"-artifact_prefix={artifacts}/{name}-",
           f"-max_len={max_len}", "-timeout=30", "-rss_limit_mb=3072", "-print_pcs=0"]
    start = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))}
    with log_path.open("wb") as out:
        proc = subprocess.run(cmd, cwd=_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                              timeout=seconds + 600, check=False)
    text = log_path.read_text(errors="replace")
    found = _EXECUTED.findall(text)
    rate = _RATE.findall(text)
    return Result(name, int(found[-1]) if found else 0, int(rate[-1]) if rate else 0, time.monotonic() - start,
                  proc.returncode,
                  sorted(set(_ARTIFACT.findall(text))), str(log_path))


def main(argv: list[str] | None = None) -> int:
    """Run the named targets (or ``all``) and print executions and crashes per target.

    Returns:
        0 when no target crashed, 1 otherwise, 2 for a usage error.
    """
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--worker"]:
        rest = args[2:]
        _worker(args[1], rest[1:] if rest[:1] == ["--"] else rest)
        return 0  # pragma: no cover - libFuzzer exits the process
    from tests.fuzz.targets import TARGETS  # not at the top: a worker imports it instrumented

    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("target", nargs="?", default="all", help=f"one of {', '.join(TARGETS)}, or all")
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time per target (default 60)")
    parser.add_argument("--jobs", type=int, default=1, help="targets fuzzed at once (default 1)")
    parser.add_argument("--corpus", type=Path, default=None, help="keep corpora in DIR/<target>")
    parser.add_argument("--artifacts", type=Path, default=None,
                        help="where crashing inputs and logs go (default: a new temporary directory)")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    ns = parser.parse_args(args)
    if ns.list:
        for t in TARGETS.values():
            print(f"{t.name:16} {t.about}")
        return 0
    names = list(TARGETS) if ns.target == "all" else [ns.target]
    if any(n not in TARGETS for n in names):
        parser.error(f"unknown target {ns.target!r}; one of {', '.join(TARGETS)}, or all")
    artifacts = ns.artifacts or Path(tempfile.mkdtemp(prefix="fuzz-artifacts-"))
    corpus_root = ns.corpus or Path(tempfile.mkdtemp(prefix="fuzz-corpus-"))
    try:
        with ThreadPoolExecutor(max(1, ns.jobs)) as pool:
            results = list(pool.map(lambda n: _run_target(n, ns.seconds, corpus_root, artifacts, TARGETS[n].max_len),
                                    names))
    finally:
        if ns.corpus is None:
            shutil.rmtree(corpus_root, ignore_errors=True)
    print(f"{'target':16} {'executions':>12} {'exec/s':>8} {'crashes':>8}")
    for r in results:
        print(f"{r.target:16} {r.executions:>12} {r.per_second:>8} {r.crashes:>8}")
        for path in r.artifacts:
            print(f"  crash input: {path}")
        if r.crashes:
            print(f"  log: {r.log_path}")
    print(f"logs and artifacts: {artifacts}")
    return 1 if any(r.crashes for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
