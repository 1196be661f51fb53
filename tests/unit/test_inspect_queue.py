"""``backfill inspect queue``: a queue's length and first items as JSON lines, read without removing them."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from consumers.inspect_queue import item_line
from consumers.queue import Queue
from runtime.commands.cli import main


def _fill(path: Path, name: str, items: list[object]) -> None:
    queue = Queue(name, create_new_queue=True, path=path)
    try:
        queue.batch_add_items_to_queue(items)
    finally:
        queue.close()


def test_prints_the_length_and_the_first_items(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "q.sqlite"
    items = [{"did": f"did:plc:{i}", "kind": "commit", "n": i} for i in range(1500)]
    _fill(path, "demo", items)
    assert main(["inspect", "queue", "demo", "--queue-path", str(path), "--limit", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"queue 'demo' in {path}: 1,500 items; the first 3:"
    assert [orjson.loads(line) for line in lines[1:]] == items[:3]
    queue = Queue("demo", path=path)
    try:
        assert queue.get_queue_length() == 1500, "inspecting takes nothing out"
    finally:
        queue.close()


def test_the_path_comes_from_the_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "env.sqlite"
    _fill(path, "q", [1, 2])
    monkeypatch.setenv("BACKFILL_QUEUE_PATH", str(path))
    assert main(["inspect", "queue", "q"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"queue 'q' in {path}: 2 items; the first 2:", "  1", "  2"]


def test_limit_zero_and_an_empty_queue_print_only_the_length(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "q.sqlite"
    _fill(path, "full", [{"a": 1}])
    _fill(path, "empty", [])
    assert main(["inspect", "queue", "full", "--queue-path", str(path), "--limit", "0"]) == 0
    assert main(["inspect", "queue", "empty", "--queue-path", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"queue 'full' in {path}: 1 items",
                                                    f"queue 'empty' in {path}: 0 items"]


def test_width_cuts_long_items() -> None:
    payload = {"text": "x" * 300}
    assert item_line(payload) == "  " + orjson.dumps(payload).decode()
    cut = item_line(payload, 20)
    assert cut == "  " + orjson.dumps(payload).decode()[:20] + "..."
    assert item_line([1], 20) == "  [1]", "a short item is not marked as cut"


@pytest.mark.parametrize("case", ["no file", "no queue", "negative limit"])
def test_usage_errors_exit_2_and_create_nothing(case: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "q.sqlite"
    if case != "no file":
        _fill(path, "there", [1])
    name = "there" if case == "negative limit" else "missing"
    extra = ["--limit", "-1"] if case == "negative limit" else []
    assert main(["inspect", "queue", name, "--queue-path", str(path), *extra]) == 2
    assert "backfill: error:" in capsys.readouterr().err
    assert path.exists() == (case != "no file")
