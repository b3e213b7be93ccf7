"""Thread choice: OMP_NUM_THREADS wins; otherwise the cores other work leaves free, never fewer than one."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from skillbook.run import threads


def test_user_setting_wins():
    assert threads.choose_threads({"OMP_NUM_THREADS": "3"}, busy=0.0) == (3, "OMP_NUM_THREADS=3")
    assert threads.choose_threads({"OMP_NUM_THREADS": "x"}, busy=0.0).reason.endswith("ignored")


def test_busy_cores_are_left_to_their_owner():
    n = len(threads.usable_cores())
    assert threads.choose_threads({}, busy=0.0).threads == n
    assert threads.choose_threads({}, busy=float(n)).threads == 1  # at least one
    busy = threads.choose_threads({}, busy=n - 1.0)
    assert busy.threads == 1 and ("OMP_NUM_THREADS" in busy.reason or n == 1)


def test_a_value_the_runner_set_is_not_mistaken_for_the_users():
    env = {"OMP_NUM_THREADS": "1", threads.CHOSEN_ENV: "1"}
    assert threads.choose_threads(env, busy=0.0).threads == len(threads.usable_cores())


def test_a_spinning_process_is_measured_as_busy():
    idle = threads.busy_elsewhere(threads.usable_cores(), seconds=0.3)
    if idle is None:  # not Linux: nothing to measure
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = threads.busy_elsewhere(threads.usable_cores(), seconds=0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and busy >= 0.6, (idle, busy)  # one core's worth, give or take the scheduler


def test_the_run_log_says_what_was_chosen(tmp_path):
    from conftest import ROOT
    from skillbook.run import recipe, runner

    rec = recipe.load(ROOT / "tests" / "fixtures" / "skills" / "example-demo")
    result = runner.run(rec, recipe.resolve(rec), runs_dir=tmp_path, quiet=True)
    log = (tmp_path / "example-demo" / "latest").glob("log.txt")  # the run just finished
    assert f"threads: {os.environ['OMP_NUM_THREADS']} (OMP_NUM_THREADS=" in next(log).read_text()
    assert result["status"] == "ok"
