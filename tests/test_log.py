"""The multiway logger (rank-aware, through tqdm.write) and progress bars that stay quiet in log files."""

from __future__ import annotations

import io
import logging

from multiway.log import get_logger, progress


def test_progress_on_a_non_terminal_writes_a_few_plain_lines(monkeypatch):
    monkeypatch.setenv("MULTIWAY_PROGRESS_INTERVAL", "30")
    out = io.StringIO()  # not a terminal
    total = 0
    for i in progress(range(1000), file=out, desc="steps"):
        total += i
    text = out.getvalue()
    assert total == sum(range(1000)) and "\r" not in text
    lines = text.splitlines()
    assert 1 <= len(lines) <= 3 and "1000/1000" in lines[-1]


def test_progress_interval_zero_prints_every_step(monkeypatch):
    # the same bar with the interval at 0 redraws on every step: the interval is what keeps log files short
    monkeypatch.setenv("MULTIWAY_PROGRESS_INTERVAL", "0")
    out = io.StringIO()
    for _ in progress(range(200), file=out, miniters=1):
        pass
    assert len(out.getvalue().splitlines()) > 100


def test_progress_is_off_on_other_ranks(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    out = io.StringIO()
    for _ in progress(range(10), file=out):
        pass
    assert out.getvalue() == ""


def test_logger_is_rank_aware_and_writes_through_tqdm(monkeypatch, capsys):
    log = get_logger("multiway.test_log")
    assert log.name == "multiway.test_log" and get_logger().name == "multiway"
    assert len([h for h in logging.getLogger("multiway").handlers if h.get_name() == "multiway-tqdm"]) == 1
    get_logger()  # configuring twice adds no second handler
    assert len([h for h in logging.getLogger("multiway").handlers if h.get_name() == "multiway-tqdm"]) == 1
    log.info("hello from rank 0")
    monkeypatch.setenv("RANK", "3")
    log.info("info from rank 3")
    log.warning("warning from rank 3")
    err = capsys.readouterr().err
    assert "[multiway] hello from rank 0" in err and "info from rank 3" not in err and "warning from rank 3" in err
    monkeypatch.setenv("MULTIWAY_LOG_ALL_RANKS", "1")
    log.info("info from rank 3 again")
    assert "info from rank 3 again" in capsys.readouterr().err
