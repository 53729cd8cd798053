"""Long work stays observable without a terminal: a log line per tenth, and short loops stay quiet."""

import logging

import effspec.progress as progress


def test_track_logs_tenths_of_long_loops_without_a_bar(monkeypatch, caplog):
    monkeypatch.setenv("EFFSPEC_PROGRESS", "0")
    monkeypatch.setattr(progress, "QUIET_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="effspec.progress"):
        assert list(progress.track(range(25), "rank search")) == list(range(25))
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == [f"rank search: {i}/25" for i in (2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 25)]
    assert lines[-1].endswith("about 0 s left")


def test_short_loops_and_unsized_iterables_log_nothing(monkeypatch, caplog):
    monkeypatch.setenv("EFFSPEC_PROGRESS", "0")
    with caplog.at_level(logging.INFO, logger="effspec.progress"):
        assert sum(progress.track(range(100), "quick")) == 4950  # done long before QUIET_SECONDS
        monkeypatch.setattr(progress, "QUIET_SECONDS", 0.0)
        assert list(progress.track(iter("abc"), "no length")) == ["a", "b", "c"]  # no total: no tenths to report
    assert caplog.records == []
