"""
Run model-written Python (HumanEval programs) in a fresh, limited interpreter.

    from nanochat.execution import execute_code
    result = execute_code("print(1 + 1)")      # ExecutionResult(success=True, stdout="2\n", ...)

How: every call starts `python -I` (isolated mode: no PYTHON* variables, no user site, no script dir on
sys.path) as a child process with
  * an environment scrubbed to PATH=/usr/bin:/bin and OMP_NUM_THREADS=1 (parent secrets are not inherited),
  * a fresh temporary working directory, removed afterwards, and stdin = /dev/null (input() raises EOFError),
  * resource limits set by the child on itself before the program runs: address space and data segment =
    maximum_memory_bytes (a big allocation raises MemoryError; not on macOS, which refuses these limits),
    CPU seconds ~ timeout, no core files, written
    files <= 16 MiB, and no new processes or threads (RLIMIT_NPROC = 0; the kernel ignores it for root),
  * a guard that sets dangerous functions to None: os.system/fork/kill/remove/unlink/rmdir/rename/chdir/...,
    shutil.rmtree/move/chown, subprocess.Popen, builtins exit/quit/help, and hides resource/psutil/...,
  * the program executed with fresh globals (__name__ == "__main__"), so the guard's names are invisible.
The wall-clock timeout is subprocess's own (the child's session is killed), so it works from any thread,
unlike SIGALRM. Output goes to anonymous temp files and is read back capped (1 MiB each).

What this does NOT protect against: it is NOT a security boundary. The network is open, ctypes and cffi can
call anything, files outside the temp dir can be read and overwritten with open(), os.posix_spawn and the
_posixsubprocess module still start processes when running as root, and the None-ed functions can be
recovered by a determined program (e.g. via importlib.reload). It stops accidents of a well-meaning model
(rm -rf, fork bombs, runaway loops and allocations), not attackers. Run untrusted code in a container or VM.
"""

import os
import sys
import signal
import subprocess
import tempfile
from dataclasses import dataclass

MAX_OUTPUT_BYTES = 1 << 20   # per stream, what the parent reads back
MAX_FILE_BYTES = 16 << 20    # RLIMIT_FSIZE: the child's own files and its stdout/stderr

@dataclass
class ExecutionResult:
    success: bool            # the program ran to the end (exit code 0) within its limits
    stdout: str
    stderr: str
    error: str | None = None  # last stderr line (e.g. "ZeroDivisionError: division by zero") or the limit hit
    timeout: bool = False
    memory_exceeded: bool = False

# Runs in the child before the program. {placeholders} are filled with repr()'d values by execute_code.
_GUARD = r'''
import builtins, faulthandler, os, resource, shutil, subprocess, sys

memory, cpu_seconds = {memory}, {cpu_seconds}
limits = [(resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_FSIZE, {max_file_bytes}), (resource.RLIMIT_CORE, 0),
          (resource.RLIMIT_NPROC, 0)]
if {limit_memory}:  # macOS refuses RLIMIT_AS/DATA (setrlimit raises ValueError): there only the timeouts bound a program
    limits += [(resource.RLIMIT_AS, memory), (resource.RLIMIT_DATA, memory)]
for limit, value in limits:
    resource.setrlimit(limit, (value, value))

# Compiled under its real file name so tracebacks can show the offending line.
with open({program_path}, encoding="utf-8") as f:
    _compiled = compile(f.read(), {program_path}, "exec")

faulthandler.disable()
for name in ["exit", "quit", "help"]:
    setattr(builtins, name, None)
for name in ["kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
             "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
             "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"]:
    setattr(os, name, None)
for name in ["rmtree", "move", "chown"]:
    setattr(shutil, name, None)
subprocess.Popen = None
for name in ["ipdb", "joblib", "resource", "psutil", "tkinter"]:
    sys.modules[name] = None

exec(_compiled, {{"__name__": "__main__", "__builtins__": builtins}})
'''

def _read_capped(f, keep):
    """Read a captured stream, keeping the first (keep="head") or last (keep="tail") MAX_OUTPUT_BYTES."""
    size = f.seek(0, os.SEEK_END)
    if size <= MAX_OUTPUT_BYTES:
        f.seek(0)
        return f.read().decode("utf-8", errors="replace")
    note = f"[... {size - MAX_OUTPUT_BYTES} bytes of output dropped ...]"
    if keep == "head":
        f.seek(0)
        return f.read(MAX_OUTPUT_BYTES).decode("utf-8", errors="replace") + "\n" + note
    f.seek(size - MAX_OUTPUT_BYTES)
    return note + "\n" + f.read().decode("utf-8", errors="replace")

def execute_code(code, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024):
    """Run `code` in a fresh limited interpreter (see the module docstring); never raises for the program's faults."""
    assert timeout > 0, f"timeout must be positive, got {timeout}"
    assert maximum_memory_bytes > 0, f"maximum_memory_bytes must be positive, got {maximum_memory_bytes}"
    with tempfile.TemporaryDirectory(prefix="nanochat_exec_") as work_dir, \
            tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        program_path = os.path.join(work_dir, "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(code)
        guard = _GUARD.format(memory=int(maximum_memory_bytes), cpu_seconds=int(timeout) + 1,
                              max_file_bytes=MAX_FILE_BYTES, program_path=repr(program_path),
                              limit_memory=sys.platform != "darwin")
        # start_new_session: the child leads its own process group, so a timeout kills anything it started too.
        proc = subprocess.Popen([sys.executable, "-I", "-c", guard], cwd=work_dir, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode, timed_out = proc.returncode, True
        # RLIMIT_CPU ends a busy loop with SIGXCPU: that is a timeout too.
        timed_out = timed_out or returncode == -signal.SIGXCPU
        stdout, stderr = _read_capped(out, keep="head"), _read_capped(err, keep="tail")

    memory_exceeded = "MemoryError" in stderr
    success = returncode == 0 and not timed_out
    error = None
    if timed_out:
        error = f"timed out after {timeout} s"
    elif not success:
        lines = [line for line in stderr.splitlines() if line.strip()]
        error = lines[-1] if lines else f"exited with code {returncode}"
    return ExecutionResult(success=success, stdout=stdout, stderr=stderr, error=error,
                           timeout=timed_out, memory_exceeded=memory_exceeded)
