"""``backfill simulate plc``: serve a PLC directory simulator until interrupted."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Final

from runtime.process.options import Opt, add_options, log_level_option
from runtime.simulator.plc import PlcDirectory, PlcSimulator, load_documents

OPTIONS: Final = (
    Opt(("--documents",), "documents", "SIM_PLC_DOCUMENTS", None,
        "JSON object of DID -> DID document to serve (.zst allowed; e.g. the fixtures' did_docs.json.zst)"),
    Opt(("--host",), "host", "SIM_HOST", "127.0.0.1", "listen address"),
    Opt(("--port",), "port", "SIM_PLC_PORT", 2582, "listen port (0 = any free port)", type=int),
    log_level_option(),
)


#: One line for ``backfill --help``.
HELP: Final = "serve a simulated PLC directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``backfill simulate plc``."""
    add_options(parser, OPTIONS)


def main(ns: argparse.Namespace) -> int:
    """Entry point of ``backfill simulate plc``."""
    docs = load_documents(Path(ns.documents)) if ns.documents else {}
    sim = PlcSimulator(PlcDirectory(docs), ns.host, ns.port)
    asyncio.run(sim.serve_until_signal(lambda: f"PLC directory simulator: {sim.url}  "
                                              f"({len(sim.directory.documents)} documents; "
                                              f"register more with POST {sim.url}/<did>)"))
    return 0
