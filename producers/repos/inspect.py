"""``backfill inspect car FILE``: list a repository CAR's records, as ``goat repo ls`` does.

Default output: ``collection/rkey<TAB>cid`` per record, in MST (key) order. ``--records``: one JSON
object per record (``{"key", "cid", "record"}``, the record in its atproto JSON form).
``--commit``: the signed commit's CID, DID, rev, data (MST root) CID and version. The file is read
from disk block by block (bounded memory, any size). Problems with single records are reported on
stderr and make the exit status 1; a CAR that cannot be read at all also exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Final, TextIO

import orjson

from runtime.atproto.car import open_car
from runtime.atproto.commit import verify_commit
from runtime.atproto.dagcbor import record_json_form
from runtime.atproto.errors import AtprotoFormatError
from runtime.atproto.mst import walk
from runtime.atproto.repo import read_commit
from runtime.contract.nsid import CollectionFilter
from runtime.process.options import Opt, add_options

OPTIONS: Final = (
    Opt(("--records",), "records", None, False, "print every record as a JSON line", action="store_true"),
    Opt(("--commit",), "commit", None, False, "print the signed commit (DID, rev, data CID) and exit",
        action="store_true"),
    Opt(("--collection", "-c"), "collections", None, None,
        "only this collection; repeatable; prefix wildcards like app.bsky.feed.* allowed",
        action="append", metavar="NSID"),
    Opt(("--did-key",), "did_key", None, None, "check the commit signature against this did:key"),
)


#: One line for ``backfill --help``.
HELP: Final = "list a repository CAR file's records"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``backfill inspect car``."""
    parser.add_argument("file", help="the CAR file (a getRepo export)")
    add_options(parser, OPTIONS)


def inspect_car(path: str, *, records: bool = False, commit_only: bool = False,
                collections: list[str] | None = None, did_key: str | None = None,
                out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Print the CAR at ``path`` as described in the module docstring; return the exit status."""
    try:
        car = open_car(path, verify=False)
    except (OSError, AtprotoFormatError) as e:
        print(f"backfill inspect car: {path}: {e}", file=err)
        return 1
    problems = 0
    with car:
        try:
            commit = read_commit(car)
            if did_key:
                block = car.get(car.roots[0])
                assert block is not None  # read_commit found it
                verify_commit(block, did_key)
        except AtprotoFormatError as e:
            print(f"backfill inspect car: {path}: {e}", file=err)
            return 1
        if commit_only:
            out.write(f"commit\t{car.roots[0]}\ndid\t{commit.did}\nrev\t{commit.rev}\ndata\t{commit.data}\n"
                      f"version\t{commit.version}\n")
            if did_key:
                out.write("signature\tvalid\n")
            return 0
        wanted = CollectionFilter(collections or [])
        try:
            for key, cid in walk(commit.data, car, verify=True):
                if not wanted(key.partition("/")[0]):
                    continue
                if not records:
                    out.write(f"{key}\t{cid}\n")
                    continue
                block = car.get(cid)
                problem = None
                if block is None:
                    problem = f"missing block {cid}"
                elif not cid.matches(block):
                    problem = f"block does not match its CID {cid}"
                else:
                    try:
                        value = record_json_form(block)
                    except AtprotoFormatError as e:
                        problem = str(e)
                if problem is not None:
                    problems += 1
                    print(f"backfill inspect car: record {key}: {problem}", file=err)
                    continue
                out.write(orjson.dumps({"key": key, "cid": str(cid), "record": value}).decode())
                out.write("\n")
        except AtprotoFormatError as e:
            print(f"backfill inspect car: {path}: MST: {e}", file=err)
            return 1
    return 1 if problems else 0


def main(ns: argparse.Namespace) -> int:
    """Entry point of ``backfill inspect car``."""
    try:
        return inspect_car(ns.file, records=ns.records, commit_only=ns.commit, collections=ns.collections,
                           did_key=ns.did_key)
    except BrokenPipeError:
        # The reader (``| head``) went away: stop quietly, as command-line tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
