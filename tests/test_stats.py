"""The master's figures, its callbacks, its pid file and its metrics endpoint, without a running master."""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from sticky_server.errors import PidFileError
from sticky_server.listener import Bind
from sticky_server.master.hooks import run_hooks
from sticky_server.master.link import Link
from sticky_server.master.metrics import MetricsServer, render
from sticky_server.master.pidfile import (
    master_holds,
    read_pid,
    remove_pid_file,
    stats_file_of,
    stats_writer,
    write_pid_file,
)
from sticky_server.master.process import WorkerProcess
from sticky_server.master.stats import SlotCounters, collect, log_stats
from sticky_server.master.supervisor import Supervisor
from tests.fakes import FakeSpawn


@pytest.fixture
def figures() -> Any:
    spawn = FakeSpawn()
    supervisor = Supervisor(3, ["x"], spawn=spawn)
    supervisor.boot()
    current = {}
    for slot in (0, 2):  # slot 1 has no worker right now
        worker: WorkerProcess = supervisor.current[slot]
        link = Link(worker, last_heard=0.0)
        link.ready(1024)
        link.live = 10 * (slot + 1)
        current[slot] = link
    supervisor.restarts[2] = 4
    counters = SlotCounters(handed_off={0: 7, 2: 5}, lost_no_room={2: 1}, accepted_by_workers=3)
    counters.messages_dropped[1] = 6
    yield collect(supervisor, current, counters, 12, "kernel")
    spawn.close()


def test_the_figures_per_slot_and_their_totals(figures: dict[str, Any]) -> None:
    assert figures["steering"] == "kernel" and figures["pid"] == os.getpid()
    assert [worker["live"] for worker in figures["workers"]] == [10, 0, 30]
    assert [worker["pid"] is None for worker in figures["workers"]] == [False, True, False]
    assert figures["accepted"] == 15 and figures["handed_off"] == 12 and figures["live"] == 40
    assert figures["restarts"] == 4 and figures["lost_no_room"] == 1
    assert figures["workers"][0]["descriptor_limit"] == 1024
    assert [worker["messages_dropped"] for worker in figures["workers"]] == [0, 6, 0]
    assert figures["messages_dropped"] == 6


def test_sigusr1_logs_one_line_for_the_master_and_one_per_slot(
    figures: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, "sticky_server.master"):
        log_stats(figures)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 4 and lines[0].startswith("stats: 3 workers, 15 connections accepted, 12 handed off")


def test_the_prometheus_text_names_every_slot(figures: dict[str, Any]) -> None:
    text = render(figures)
    assert "sticky_server_workers 3\n" in text
    assert 'sticky_server_connections_live{slot="2"} 30\n' in text
    assert 'sticky_server_worker_up{slot="1"} 0\n' in text
    assert 'sticky_server_messages_dropped_total{slot="1"} 6\n' in text
    assert "process_start_time_seconds " in text and text.endswith("\n")


def test_the_metrics_endpoint_answers_each_format_and_404_elsewhere(figures: dict[str, Any]) -> None:
    server = MetricsServer(Bind("127.0.0.1", 0), lambda: figures)
    try:
        base = f"http://127.0.0.1:{server.address[1]}"
        with urllib.request.urlopen(f"{base}/stats", timeout=5) as answer:
            assert json.loads(answer.read())["live"] == 40
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as answer:
            assert b"sticky_server_workers 3" in answer.read()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/nowhere", timeout=5)
        assert refused.value.code == 404
    finally:
        server.close()
    with pytest.raises(ValueError, match="not on a Unix socket"):
        MetricsServer(Bind(None, 0, "/tmp/metrics.sock"), lambda: figures)


def test_a_hook_that_raises_is_logged_and_the_rest_still_run(caplog: pytest.LogCaptureFixture) -> None:
    ran: list[int] = []

    def broken(slot: int) -> None:
        raise RuntimeError("oops")

    with caplog.at_level(logging.ERROR, "sticky_server.master"):
        run_hooks([ran.append, broken, ran.append], 4)
    assert ran == [4, 4] and "broken raised" in caplog.text


def test_the_pid_file_is_locked_while_held_and_removed_only_by_its_master(tmp_path: Path) -> None:
    path = tmp_path / "app.pid"
    lock = write_pid_file(path)
    assert read_pid(path) == os.getpid() and master_holds(path)
    stats_writer(stats_file_of(path))({"live": 1})
    assert json.loads(stats_file_of(path).read_text()) == {"live": 1}
    remove_pid_file(path, lock)
    assert not path.exists() and not stats_file_of(path).exists() and not master_holds(path)


def test_a_pid_file_that_is_a_link_or_names_no_pid_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("1\n")
    link = tmp_path / "app.pid"
    link.symlink_to(target)
    with pytest.raises(PidFileError, match="symbolic link"):
        read_pid(link)
    garbage = tmp_path / "garbage.pid"
    garbage.write_text("not a pid\n")
    assert read_pid(garbage) is None


def test_a_stale_pid_file_nobody_holds_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "app.pid"
    path.write_text("999999\n")  # a master that died without removing it
    lock = write_pid_file(path)
    assert read_pid(path) == os.getpid()
    remove_pid_file(path, lock)
