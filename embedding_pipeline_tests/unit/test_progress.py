"""Stage progress: reports reach the listeners of this process, throttled where asked, as readable lines."""

from __future__ import annotations

import io

import pytest

from embedding_pipeline.runtime import progress


def test_a_stage_reports_each_step_to_every_listener_and_nothing_when_nobody_listens():
    progress.Stage("embed", 10).advance(10)  # nobody listening: no error, nothing kept
    seen: list[progress.Progress] = []
    with progress.listening(seen.append):
        stage = progress.Stage("embed", 10)
        stage.advance(4)
        stage.advance(6)
    progress.Stage("embed", 10).advance(10)  # after the block: not seen
    assert [(u.stage, u.done, u.total) for u in seen] == [("embed", 0, 10), ("embed", 4, 10), ("embed", 10, 10)]
    assert seen[-1].finished and not seen[1].finished


def test_lines_say_count_share_rate_and_eta():
    update = progress.Progress("embed", 250, 1000, 10.0)
    assert update.line() == "embed: 250/1000 images (25%), 25.0 images/s, ETA 30 s"
    assert progress.Progress("index", 5, 5, 1.0, "rows").line() == "index: 5/5 rows (100%), 5.0 rows/s"
    assert progress.Progress("embed", 0, 9, 0.0).eta_s is None


def test_throttled_passes_the_first_and_last_and_at_most_one_per_interval(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    seen: list[int] = []
    throttled = progress.Throttled(lambda u: seen.append(u.done), every_s=5.0)
    with progress.listening(throttled):
        stage = progress.Stage("preprocess", 100)
        for _ in range(99):
            clock[0] += 0.5
            stage.advance(1)
        clock[0] += 0.5
        stage.advance(1)
    # The first report, then one every 5 s of the clock (10 steps of 0.5 s), the last one included.
    assert seen == list(range(0, 101, 10))


def test_the_cli_draws_bars_on_a_terminal_and_plain_lines_otherwise(monkeypatch):
    from embedding_pipeline import cli

    class FakeTerminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = FakeTerminal()
    monkeypatch.setattr(cli.sys, "stderr", terminal)
    bars = cli._ProgressBars()
    with progress.listening(bars):
        stage = progress.Stage("embed", 64)
        stage.advance(32)
        stage.advance(32)
    bars.close()
    drawn = terminal.getvalue()
    assert "embed" in drawn and "64/64" in drawn and "images/s" in drawn

    plain = io.StringIO()
    monkeypatch.setattr(cli.sys, "stderr", plain)
    cli._print_progress(progress.Progress("index", 3, 4, 1.0, "rows"))
    assert plain.getvalue() == "index: 3/4 rows (75%), 3.0 rows/s, ETA 0 s\n"


@pytest.mark.parametrize("argv", [["ingest", "x", "--json"], ["ingest", "x", "--verbose"]])
def test_ingest_takes_json_and_verbose(argv):
    from embedding_pipeline.cli import build_parser

    args = build_parser().parse_args(argv)
    assert args.json == ("--json" in argv) and args.verbose == ("--verbose" in argv)


def test_a_failing_listener_is_dropped_and_never_fails_the_stage(caplog):
    calls: list[int] = []

    def broken(update: progress.Progress) -> None:
        calls.append(update.done)
        raise BrokenPipeError("the terminal went away")

    with progress.listening(broken):
        stage = progress.Stage("index", 3, "rows")
        stage.advance(1)
        stage.advance(2)
    assert calls == [0] and "progress display stopped" in caplog.text
