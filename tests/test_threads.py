"""Threads: the default degrades gracefully on a shared machine (CPUs this process may use, less those other processes
keep busy, at least 1; OpenMP threads sleep when idle), and whatever the user sets wins: --threads, AID_THREADS,
OMP_NUM_THREADS / OMP_WAIT_POLICY."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aid_cli import threads
from aid_cli.errors import UserError

ENTRY_POINT = Path(sys.executable).parent / "aid"


def test_auto_is_usable_less_busy_at_least_one(monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 4)
    for busy, want in [(0, 4), (1, 3), (3, 1), (9, 1)]:
        monkeypatch.setattr(threads, "busy_cpus", lambda b=busy: b)
        assert threads.auto_threads() == want


def test_busy_counts_runnable_processes_and_ignores_cores_it_cannot_use(monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads, "runnable_now", lambda: 1)
    assert threads.busy_cpus() == 1  # one other job on a 2-core machine
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 64)  # a 2-CPU container on a host with 64 cores
    monkeypatch.setattr(threads, "runnable_now", lambda: 40)
    assert threads.busy_cpus() == 0
    monkeypatch.setattr(threads, "runnable_now", lambda: None)  # no /proc: the load average instead
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.6, 0.0, 0.0))
    assert threads.busy_cpus() == 2


@pytest.mark.skipif(not Path("/proc/loadavg").exists(), reason="Linux only")
def test_runnable_now_reads_proc():
    n = threads.runnable_now()
    assert isinstance(n, int) and n >= 0


def test_cgroup_quota_caps_usable_cpus(monkeypatch, tmp_path):
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # 1.5 CPUs
    real_open = open
    monkeypatch.setattr(threads, "open", lambda p, *a, **k: real_open(quota if p == "/sys/fs/cgroup/cpu.max" else p,
                                                                       *a, **k), raising=False)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert threads.usable_cpus() == 2
    quota.write_text("max 100000\n")
    assert threads.usable_cpus() == 4


def test_configure_environment_respects_the_user(monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    monkeypatch.setattr(threads, "busy_cpus", lambda: 1)
    env = {}
    assert threads.configure_environment(env).startswith("1 (auto")
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    env = {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.configure_environment(env) == "2 (OMP_NUM_THREADS)"
    assert env == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}
    env = {"OMP_NUM_THREADS": "2", "AID_THREADS": "3"}
    assert threads.configure_environment(env) == "3 (AID_THREADS)" and env["OMP_NUM_THREADS"] == "3"
    for bad in ("0", "two"):
        with pytest.raises(UserError, match="AID_THREADS"):
            threads.configure_environment({"AID_THREADS": bad})


def run_aid(*args, **env):
    if not ENTRY_POINT.exists():
        pytest.skip("no installed entry point")
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "AID_THREADS", "OMP_WAIT_POLICY")}
    environ.update(env)
    return subprocess.run([str(ENTRY_POINT), *map(str, args)], capture_output=True, text=True, env=environ, timeout=300)


def test_entry_point_chooses_threads_before_torch_starts():
    r = run_aid("env", "--json", AID_THREADS="1")
    assert r.returncode == 0, r.stderr
    cpu = json.loads(r.stdout)["devices"]["cpu"]
    assert cpu["torch_threads"] == 1 and cpu["threads_chosen"] == "1 (AID_THREADS)"
    r = run_aid("env", "--json")
    cpu = json.loads(r.stdout)["devices"]["cpu"]
    assert cpu["threads_chosen"].startswith(f"{cpu['torch_threads']} (auto: ")
    assert json.loads(r.stdout)["env"]["OMP_WAIT_POLICY"] == "PASSIVE"


@pytest.mark.parametrize("command", ["inpaint", "bench", "metrics", "pretrain", "models eval", "train"])
def test_compute_commands_take_threads(command):
    r = run_aid(*command.split(), "--help", COLUMNS="200")
    assert r.returncode == 0 and "--threads" in r.stdout, command
    r = run_aid(*command.split(), "--threads", "0")
    assert r.returncode == 2 and "--threads" in r.stderr and "Traceback" not in r.stderr
