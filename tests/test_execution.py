"""
The HumanEval sandbox (nanochat/execution.py): well-behaved programs run and report, runaway ones are stopped,
and the common accidents (system calls, forks, deletes, stdin reads, parent secrets) fail, with or without
isolation (tests/test_sandbox_attacks.py holds the attacks that only isolation stops).
Each case spawns one short-lived interpreter (~0.1 s); the timeout case costs its 1 s timeout.
"""

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanochat import execution
from nanochat.execution import execute_code

def test_output_returned():
    result = execute_code("def add(a, b):\n    return a + b\nprint(add(2, 3))\nprint('done')\n")
    assert result.success, result
    assert result.stdout == "5\ndone\n"
    assert result.stderr == ""  # nothing of the sandbox's own start-up reaches the program's stderr
    assert result.error is None and not result.timeout and not result.memory_exceeded

def test_quotes_backslashes_braces_survive():
    code = 'print("a\'b\\"c", r"\\n", {1: {"x": "{}"}}, f"{{}}")\n'
    result = execute_code(code)
    assert result.success, result
    assert result.stdout == 'a\'b"c \\n {1: {\'x\': \'{}\'}} {}\n'

def test_exception_reported_in_error():
    result = execute_code("x = 1\ny = x / 0\n")
    assert not result.success
    assert result.error == "ZeroDivisionError: division by zero"
    assert "y = x / 0" in result.stderr  # the traceback shows the program's own line

def test_failed_assert_is_a_failure():
    # HumanEval's check() signals a wrong answer with AssertionError: that must read as not passed.
    result = execute_code("def check(f):\n    assert f(2) == 5\ncheck(lambda x: x * 2)\n")
    assert not result.success and result.error == "AssertionError"

def test_infinite_loop_killed_within_timeout():
    start = time.time()
    result = execute_code("while True:\n    pass\n", timeout=1.0)
    elapsed = time.time() - start
    assert result.timeout and not result.success, result
    assert elapsed < 3.0, f"the loop ran {elapsed:.1f} s for a 1 s timeout"

def test_big_allocation_is_memory_exceeded():
    result = execute_code("x = bytearray(1024 * 1024 * 1024)\nprint('allocated')\n")
    assert not result.success and result.memory_exceeded, result
    assert "allocated" not in result.stdout

def test_macos_runs_without_memory_limits(monkeypatch):
    # macOS's setrlimit refuses RLIMIT_AS/DATA; setting them anyway failed every program there (HumanEval 0%)
    monkeypatch.setattr("nanochat.execution.sys.platform", "darwin")
    result = execute_code("x = bytearray(64 * 2**20)\nprint('allocated')\n", maximum_memory_bytes=32 * 2**20)
    assert result.success and result.stdout == "allocated\n", result

def test_system_subprocess_fork_kill_fail():
    for code in ["import os\nos.system('echo escaped')\n",
                 "import subprocess\nsubprocess.run(['echo', 'escaped'])\n",
                 "import os\npid = os.fork()\nprint('escaped')\n",
                 "import os\nos.kill(1, 0)\nprint('escaped')\n",
                 "import shutil\nshutil.rmtree('/tmp')\n"]:
        result = execute_code(code)
        assert not result.success, (code, result)
        assert "escaped" not in result.stdout, (code, result)

def test_cannot_delete_file_outside_temp_dir(tmp_path):
    victim = tmp_path / "keep_me.txt"
    victim.write_text("precious")
    for code in [f"import os\nos.remove({str(victim)!r})\n",
                 f"import pathlib\npathlib.Path({str(victim)!r}).unlink()\n",
                 f"import os\nos.rename({str(victim)!r}, {str(victim) + '.moved'!r})\n"]:
        result = execute_code(code)
        assert not result.success, (code, result)
        assert victim.read_text() == "precious"

@pytest.mark.skipif(not os.path.exists("/proc/self/cwd"), reason="reads the child's cwd from Linux /proc")
def test_files_land_in_a_temp_dir_that_is_removed():
    # os.getcwd is disabled by the guard, so the program reads its working directory from /proc.
    result = execute_code("import os\nopen('out.txt', 'w').write('hi')\nprint(os.readlink('/proc/self/cwd'))\n")
    assert result.success, result
    work_dir = result.stdout.strip()
    assert os.path.basename(work_dir).startswith("nanochat_exec_"), work_dir
    assert not os.path.exists(work_dir), f"temp dir {work_dir} was left behind"

def test_parent_environment_is_invisible(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    result = execute_code("import os\nprint(os.environ.get('NANOCHAT_TEST_SECRET'))\nprint(sorted(os.environ))\n")
    assert result.success, result
    assert "hunter2" not in result.stdout
    assert result.stdout.splitlines()[0] == "None"

def test_input_fails():
    result = execute_code("name = input()\nprint('read', name)\n")
    assert not result.success and result.error.startswith("EOFError"), result

def test_fresh_globals():
    result = execute_code("print(__name__, sorted(k for k in globals() if not k.startswith('__')))\n")
    assert result.success, result
    assert result.stdout == "__main__ []\n"

def test_works_from_worker_threads():
    # SIGALRM-based timeouts raise "signal only works in main thread"; this sandbox must not care.
    jobs = [(f"print({i} * {i})", 10.0) for i in range(4)] + [("while True:\n    pass\n", 1.0)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: execute_code(*job), jobs))
    assert [r.stdout for r in results[:4]] == [f"{i * i}\n" for i in range(4)]
    assert results[4].timeout

def test_without_isolation_one_banner_names_the_fix(monkeypatch, capfd):
    monkeypatch.setattr(execution, "_probe_isolation", lambda: (None, "bubblewrap is not installed; install it: "
                                                                      "apt-get install bubblewrap"))
    monkeypatch.setattr(execution, "_banner_shown", False)
    results = [execute_code("print(6 * 7)") for _ in range(2)]
    assert [r.stdout for r in results] == ["42\n", "42\n"], results  # it still runs, with the limits and the guard
    err = capfd.readouterr().err
    assert err.count("WITHOUT isolation") == 1 and "apt-get install bubblewrap" in err, err

def test_isolation_problems_are_named(monkeypatch):
    monkeypatch.setattr(execution.sys, "platform", "linux")
    monkeypatch.setattr(execution.shutil, "which", lambda name: None)
    assert execution._probe_isolation.__wrapped__() == (None, "bubblewrap is not installed; install it: apt-get "
                                                              "install bubblewrap (or dnf/pacman install bubblewrap)")
    # installed but refused, as under Ubuntu 24.04's AppArmor rule for unprivileged user namespaces
    monkeypatch.setattr(execution.shutil, "which", lambda name: "/usr/bin/bwrap")
    monkeypatch.setattr(execution, "_bwrap_command", lambda *args: [
        sys.executable, "-c", "import sys; sys.exit('bwrap: setting up uid map: Permission denied')"])
    bwrap, problem = execution._probe_isolation.__wrapped__()
    assert bwrap is None and "(bwrap: setting up uid map: Permission denied)" in problem, problem
    assert "unprivileged user namespaces" in problem, problem

def test_failed_start_leaks_no_descriptor(monkeypatch):
    # Popen failing (fd or process limit) after the info pipe and the seccomp pipe were made must close all of them
    if execution._isolation() is None:
        pytest.skip("bwrap unusable here: no pipes are made")
    def fail(*args, **kwargs):
        raise OSError(24, "Too many open files")
    before = sorted(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(execution.subprocess, "Popen", fail)
    with pytest.raises(OSError, match="Too many open files"):
        execute_code("print(1)")
    assert sorted(os.listdir("/proc/self/fd")) == before
