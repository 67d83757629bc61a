"""
Run model-written Python (HumanEval programs, RL rollouts) in a fresh, limited and, where the
machine allows it, isolated interpreter.

    from nanochat.execution import execute_code
    result = execute_code("print(1 + 1)")      # ExecutionResult(success=True, stdout="2\n", ...)

How: every call starts `python -I` (isolated mode: no PYTHON* variables, no user site, no script dir
on sys.path) as a child process. Isolation comes from Linux namespaces, set up by bubblewrap
(`bwrap`, Debian/Ubuntu package `bubblewrap`):
  * its own pid namespace: the program sees only its own processes (no parent /proc/<pid>/environ
    or fd/1, nothing else to signal), and when it ends or is killed the kernel kills every process
    left in the namespace, forked, setsid'd or daemonized alike, and the call returns only once
    they are all gone;
  * its own network namespace with no interface up: no network at all, 127.0.0.1 included; own IPC
    and UTS too;
  * its own file system: read-only binds of /usr (with the /bin, /lib links) and of the Python
    installation, a new /proc and a minimal /dev; no /etc, no home directories, not the host's
    /tmp. The only writable place is its working directory, a private tmpfs of MAX_WORK_BYTES that
    disappears with it;
  * an unprivileged uid: started as root, the child drops to `nobody` (SANDBOX_UID) before the
    program runs, so RLIMIT_NPROC = 0 binds (the kernel exempts root) and no process can be started
    at all; no_new_privs makes setuid binaries powerless. A non-root caller's program keeps the
    caller's uid (in its own user namespace);
  * --die-with-parent: if the calling process dies, the sandbox dies with it;
  * a seccomp filter (x86_64, aarch64) that refuses new user namespaces: inside one the program
    would hold every capability, which opens kernel code (nested mounts, netfilter) that is
    otherwise out of its reach.
Where bwrap is missing or cannot create namespaces (macOS, most Docker containers), one banner line
on stderr says so and how to fix it, and only the measures below apply; a root caller's program
still drops to `nobody` there when this Python can start as nobody (not when it is installed under
/root), so it cannot start processes, read root-only files or other processes' /proc entries.
Always:
  * an environment scrubbed to PATH=/usr/bin:/bin and OMP_NUM_THREADS=1 (parent secrets are not
    inherited),
  * a fresh temporary working directory, removed afterwards, and stdin = /dev/null (input() raises
    EOFError),
  * resource limits set by the child on itself before the program runs: address space and data
    segment = maximum_memory_bytes (a big allocation raises MemoryError; not on macOS, which
    refuses these limits), CPU seconds ~ timeout, no core files, written files <= MAX_FILE_BYTES,
    and no new processes or threads (RLIMIT_NPROC = 0, which the kernel enforces on any uid but
    root's: hence the drop to nobody),
  * a guard that sets dangerous functions to None: os.system/fork/kill/remove/unlink/rmdir/rename/
    chdir/..., shutil.rmtree/move/chown, subprocess.Popen, builtins exit/quit/help, and hides
    resource/psutil/... It stops a well-meaning model's accidents; a program can undo it
    (importlib.reload(os)), the namespaces are the boundary,
  * the program executed with fresh globals (__name__ == "__main__"), so the guard's names are
    invisible,
  * its own session and process group, SIGKILLed as a whole on every exit path (normal end, error,
    timeout).
The wall-clock timeout is measured here (a pidfd poll, no signal), so it works from any thread,
unlike SIGALRM. Output goes to anonymous temp files and is read back capped (MAX_OUTPUT_BYTES each).

What this does NOT protect against, even isolated: kernel exploits (the sandbox shares the host
kernel; its seccomp filter blocks only user namespaces), reading what is bound read-only (/usr and
the Python installation: no secrets belong there), host memory used by its tmpfs (up to
MAX_WORK_BYTES on top of maximum_memory_bytes), CPU time and timing side channels, the caller's
kernel session keyring (inherited; empty unless you put keys there). Without isolation (the banner),
it is NOT a security boundary: the network is open, world-readable files can be read and writable
ones overwritten, ctypes can call anything, and where the program runs as root (see above) it can
start processes that leave the process group (setsid) and outlive the call.
tests/test_sandbox_attacks.py holds one test per attack.
"""

import contextlib
import errno
import functools
import json
import os
import platform
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

MAX_OUTPUT_BYTES = 1 << 20   # per stream, what the parent reads back
MAX_FILE_BYTES = 16 << 20    # RLIMIT_FSIZE: the child's own files and its stdout/stderr
MAX_WORK_BYTES = 64 << 20    # the isolated program's private, writable working directory (a tmpfs)
SANDBOX_UID = 65534          # "nobody" on Debian, Ubuntu and Fedora: a root caller's program's uid
_ENV = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}

@dataclass
class ExecutionResult:
    success: bool             # the program ran to the end (exit code 0) within its limits
    stdout: str
    stderr: str
    error: str | None = None  # last stderr line ("ZeroDivisionError: ...") or the limit hit
    timeout: bool = False
    memory_exceeded: bool = False

# Runs in the child before the program; execute_code fills the {placeholders} with repr()'d values.
# macOS refuses RLIMIT_AS/DATA (setrlimit raises ValueError): there only timeouts bound a program.
# Started as root, the child becomes an ordinary user, for whom RLIMIT_NPROC = 0 binds. The program
# is compiled under its real file name, so tracebacks can show the offending line.
_GUARD = r'''
import builtins, faulthandler, os, resource, shutil, subprocess, sys
limits = [(resource.RLIMIT_CPU, {cpu_seconds}), (resource.RLIMIT_FSIZE, {max_file_bytes}),
          (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, 0)]
if {limit_memory}:
    limits += [(resource.RLIMIT_AS, {memory}), (resource.RLIMIT_DATA, {memory})]
for limit, value in limits:
    resource.setrlimit(limit, (value, value))
drop_to_uid = {drop_to_uid}
if drop_to_uid is not None:
    os.setgroups([])
    os.setgid(drop_to_uid)
    os.setuid(drop_to_uid)
with open({program_path}, encoding="utf-8") as f:
    _compiled = compile(f.read(), {program_path}, "exec")
faulthandler.disable()
for module, names in [(builtins, "exit quit help"), (shutil, "rmtree move chown"),
                      (subprocess, "Popen"),
                      (os, "kill system putenv remove removedirs rmdir fork fchdir setuid forkpty "
                           "killpg rename renames truncate replace unlink fchmod fchown chmod "
                           "chown chroot lchflags lchmod lchown getcwd chdir")]:
    for name in names.split():
        setattr(module, name, None)
sys.modules.update(dict.fromkeys(["ipdb", "joblib", "resource", "psutil", "tkinter"]))
exec(_compiled, {{"__name__": "__main__", "__builtins__": builtins}})
'''

def _read_capped(f, keep):
    """Read a captured stream, keeping its first (keep="head") or last ("tail") MAX_OUTPUT_BYTES."""
    dropped = f.seek(0, os.SEEK_END) - MAX_OUTPUT_BYTES
    f.seek(dropped if keep == "tail" and dropped > 0 else 0)
    text = f.read(MAX_OUTPUT_BYTES).decode("utf-8", errors="replace")
    if dropped <= 0:
        return text
    note = f"[... {dropped} bytes of output dropped ...]"
    return f"{text}\n{note}" if keep == "head" else f"{note}\n{text}"

def _python_dirs():
    """The directories the interpreter needs, outside /usr (a venv, pyenv, conda): bound read-only
    into the sandbox."""
    dirs = {os.path.realpath(d) for d in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                          sys.base_exec_prefix)}
    dirs.add(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    outside = [d for d in sorted(dirs) if d != "/usr" and not d.startswith("/usr/")]
    return [d for d in outside if not any(d.startswith(other + "/") for other in outside)]

def _bwrap_command(bwrap, work_dir, program_path=None):
    """The bwrap argv that runs a command in the namespaces the module docstring lists, in
    `work_dir`."""
    command = [bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net",
               "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if os.geteuid() == 0:
        # run by root, bwrap makes no user namespace; the guard drops to SANDBOX_UID with these two
        # capabilities, which the kernel clears at that setuid
        command += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        command += ["--unshare-user"]  # what lets an ordinary user create the other namespaces
    command += ["--ro-bind", "/usr", "/usr"]
    for path in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]:  # /usr links, or dirs
        if os.path.islink(path):
            command += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            command += ["--ro-bind", path, path]
    dirs = _python_dirs()
    # their parents are created traversable but not listable (0711): /root/.pyenv/... shows
    # nothing else of /root
    for parent in dict.fromkeys(d[:i] for d in dirs for i in range(1, len(d)) if d[i] == "/"):
        command += ["--perms", "0711", "--dir", parent]
    for directory in dirs:
        command += ["--ro-bind", directory, directory]
    command += ["--proc", "/proc", "--dev", "/dev",
                "--perms", "0777", "--size", str(MAX_WORK_BYTES), "--tmpfs", work_dir]
    if program_path is not None:
        command += ["--ro-bind", program_path, program_path]
    return command + ["--chdir", work_dir, "--remount-ro", "/"]

# (audit arch, unshare, clone, clone3) syscall numbers: linux/audit.h,
# arch/x86/entry/syscalls/syscall_64.tbl, include/uapi/asm-generic/unistd.h
_SYSCALLS = {"x86_64": (0xC000003E, 272, 56, 435), "aarch64": (0xC00000B7, 97, 220, 435)}

def _seccomp_fd():
    """
    A pipe holding the classic-BPF seccomp program bwrap --seccomp reads (None on other
    architectures): unshare() and clone() with CLONE_NEWUSER fail with EPERM; clone3() fails with
    ENOSYS (its flags sit behind a pointer a filter cannot read; glibc then falls back to clone), as
    does any syscall of another ABI (i386 int 0x80, x32), whose numbers would slip past these
    checks.
    """
    if platform.machine() not in _SYSCALLS:
        return None
    arch, unshare, clone, clone3 = _SYSCALLS[platform.machine()]
    # BPF_LD|W|ABS, BPF_JMP|{JEQ,JGE,JSET}|K, BPF_RET|K
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
    program = [(ld, 0, 0, 4),                  # 0: seccomp_data.arch
               (jeq, 1, 0, arch), (ret, 0, 0, enosys),
               (ld, 0, 0, 0),                  # 3: seccomp_data.nr
               (jge, 0, 1, 0x40000000), (ret, 0, 0, enosys),
               (jeq, 0, 1, clone3), (ret, 0, 0, enosys),
               (jeq, 1, 0, unshare), (jeq, 0, 3, clone),
               (ld, 0, 0, 16),                 # 10: the low half of args[0], the flags of both
               (jset, 0, 1, 0x10000000),       # CLONE_NEWUSER
               (ret, 0, 0, eperm), (ret, 0, 0, allow)]
    read_fd, write_fd = os.pipe()
    # 112 bytes: fits the pipe buffer
    os.write(write_fd, b"".join(struct.pack("=HBBI", *insn) for insn in program))
    os.close(write_fd)
    return read_fd

def _bwrap_run(bwrap, work_dir, command, program_path=None, extra_fds=(), **popen_args):
    """Popen `command` inside bwrap's sandbox with the seccomp filter; every descriptor made for it
    is closed here, also when Popen fails (extra_fds: the caller's, passed to bwrap)."""
    seccomp = _seccomp_fd()
    filter_args = ["--seccomp", str(seccomp)] if seccomp is not None else []
    try:
        command = _bwrap_command(bwrap, work_dir, program_path) + filter_args + command
        return subprocess.Popen(command, **popen_args,
                                pass_fds=(*extra_fds, *([seccomp] if seccomp is not None else [])))
    finally:
        if seccomp is not None:
            os.close(seccomp)

@functools.cache
def _probe_isolation():
    """(bwrap's path, None) if bwrap can run this Python in its namespaces here, else (None, why not
    and the fix)."""
    bwrap = shutil.which("bwrap")
    if not sys.platform.startswith("linux"):
        return None, (f"Linux namespaces do not exist on {sys.platform}; run untrusted code on "
                      f"Linux or in a VM")
    if bwrap is None:
        return None, ("bubblewrap is not installed; install it: apt-get install bubblewrap "
                      "(or dnf/pacman install bubblewrap)")
    with tempfile.TemporaryDirectory(prefix="nanochat_exec_") as work_dir:
        probe = _bwrap_run(bwrap, work_dir, [sys.executable, "-I", "-S", "-c", "pass"], env=_ENV,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
        try:
            _, stderr = probe.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            probe.kill()
            raise
    if probe.returncode == 0:
        return bwrap, None
    said = (stderr.strip().splitlines() or [f"exit code {probe.returncode}"])[-1]
    return None, (f"{bwrap} cannot create namespaces here ({said}); run as root (in a "
                  f"container: one started with --privileged or --cap-add SYS_ADMIN), or "
                  f"allow unprivileged user namespaces (sysctl "
                  f"kernel.unprivileged_userns_clone=1, or an AppArmor profile for bwrap)")

@functools.cache
def _can_drop_privileges():
    """Root without bwrap: True if this Python still starts as SANDBOX_UID and can write a root-made
    temp dir chowned to it (False where the installation sits in a directory only root may enter,
    e.g. pyenv under /root)."""
    if os.geteuid() != 0:
        return False
    with tempfile.TemporaryDirectory(prefix="nanochat_exec_") as work_dir:
        os.chown(work_dir, SANDBOX_UID, SANDBOX_UID)
        check = f"open({os.path.join(work_dir, 'probe')!r}, 'w').close()"
        try:
            probe = subprocess.run([sys.executable, "-I", "-c", check], user=SANDBOX_UID,
                                   group=SANDBOX_UID, extra_groups=[], env=_ENV,
                                   stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
    return probe.returncode == 0

_isolation_lock = threading.Lock()
_banner_shown = False

def _isolation():
    """bwrap's path, or None after one banner line (per process) naming what is missing and how to
    install it."""
    global _banner_shown
    with _isolation_lock:  # the first calls may come from several threads at once: warn once
        bwrap, problem = _probe_isolation()
        if bwrap is None and not _banner_shown:
            as_root = ""
            if os.geteuid() == 0 and _can_drop_privileges():
                as_root = "; it still runs as uid nobody, so it cannot start processes"
            elif os.geteuid() == 0:
                as_root = ("; it runs as root, as this Python cannot start as uid nobody (install "
                           "it outside /root)")
            print(f"nanochat.execution: WARNING: model-written code runs WITHOUT "
                  f"isolation (your files, network and processes are reachable "
                  f"from it): {problem}{as_root}", file=sys.stderr, flush=True)
            _banner_shown = True
    return bwrap

def _wait_unreaped(proc, timeout):
    """True once the child has exited, False after `timeout` s. Where the kernel has pidfds
    (Linux >= 5.3) the child is left unreaped, so its pid, the id of its process group, cannot be
    reused before the killpg that follows."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # macOS, old kernels: reap it (a group outlives its leader)
        try:
            return proc.wait(timeout) is not None
        except subprocess.TimeoutExpired:
            return False
    try:
        return _wait_exit(pidfd, timeout)
    finally:
        os.close(pidfd)

def _wait_exit(pidfd, timeout):
    """True once the process behind `pidfd` has exited, False after `timeout` s."""
    poller = select.poll()  # not select(): it fails on fd numbers >= 1024
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))

def _alive_in_group(pid, pgid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # state, ppid, pgrp, ...
    except OSError:  # gone meanwhile
        return False
    return int(fields[2]) == pgid and fields[0] not in (b"Z", b"X")

def _wait_group_dead(pgid, timeout):
    """Until no live process is left in group `pgid` (at most `timeout` s): SIGKILL is delivered
    asynchronously, so on a busy machine a killed child can still be running for milliseconds after
    killpg returns."""
    deadline = time.monotonic() + timeout
    # no /proc (macOS): killpg is all there is
    while os.path.isdir("/proc") and time.monotonic() < deadline:
        if not any(_alive_in_group(pid, pgid) for pid in filter(str.isdigit, os.listdir("/proc"))):
            return
        time.sleep(0.005)

def _sandbox_init(info_read, info_write):
    """A pidfd of bwrap's init in the new pid namespace, from the JSON bwrap writes to --info-fd
    (None if bwrap failed before starting it). Opened while bwrap lives: bwrap alone can reap it, so
    its pid cannot be reused."""
    os.close(info_write)  # bwrap holds its copy; EOF here means bwrap is gone
    with os.fdopen(info_read, "rb") as f:
        info = b""
        while not info.rstrip().endswith(b"}") and (chunk := f.read1(4096)):
            info += chunk
    try:
        return os.pidfd_open(json.loads(info)["child-pid"])
    # ValueError: no whole JSON, bwrap failed before starting it; OSError: ended and reaped already
    # (and so all it started), or no pidfds: killpg alone
    except (OSError, ValueError):
        return None

def execute_code(code, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024):
    """Run `code` in a fresh limited interpreter (see the module docstring); never raises for the
    program's faults."""
    assert timeout > 0, f"timeout must be positive, got {timeout}"
    assert maximum_memory_bytes > 0, f"maximum_memory_bytes must be > 0, got {maximum_memory_bytes}"
    bwrap = _isolation()
    with tempfile.TemporaryDirectory(prefix="nanochat_exec_") as work_dir, \
            tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        program_path = os.path.join(work_dir, "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(code)
        os.chmod(program_path, 0o644)  # readable by the sandbox's unprivileged uid
        drop = os.geteuid() == 0 and (bwrap is not None or _can_drop_privileges())
        if drop and bwrap is None:
            os.chown(work_dir, SANDBOX_UID, SANDBOX_UID)  # no bwrap tmpfs: this is its work dir
        guard = _GUARD.format(memory=int(maximum_memory_bytes), cpu_seconds=int(timeout) + 1,
                              max_file_bytes=MAX_FILE_BYTES, program_path=repr(program_path),
                              limit_memory=sys.platform != "darwin",
                              drop_to_uid=SANDBOX_UID if drop else None)
        command = [sys.executable, "-I", "-c", guard]
        # start_new_session: the child leads its own process group, which is killed as a whole below
        popen_args = dict(cwd=work_dir, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=_ENV,
                          start_new_session=True)
        if bwrap:
            info_read, info_write = os.pipe()
            try:
                proc = _bwrap_run(bwrap, work_dir, ["--info-fd", str(info_write)] + command,
                                  program_path, extra_fds=(info_write,), **popen_args)
            except BaseException:  # bwrap never started: nobody else will close the info pipe
                os.close(info_read)
                os.close(info_write)
                raise
        else:
            proc = subprocess.Popen(command, **popen_args)
        sandbox_init = _sandbox_init(info_read, info_write) if bwrap else None
        try:
            exited = _wait_unreaped(proc, timeout)
        finally:
            if sandbox_init is not None:
                # bwrap exits as soon as the program does (or when killed), and its
                # --die-with-parent kill of the rest of the namespace then runs on in the
                # background. Killing the namespace's init kills every process in it, and the kernel
                # reports the init's exit (the pidfd poll) only once they are all gone.
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(sandbox_init, signal.SIGKILL)
                _wait_exit(sandbox_init, timeout)
                os.close(sandbox_init)
            # On every exit path, a normal end included: whatever the program left in its group dies
            # with it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if not bwrap:
                _wait_group_dead(proc.pid, 1.0)  # a killed process dies within ms, even when busy
        returncode = proc.returncode
        if bwrap and returncode > 128:
            returncode = 128 - returncode  # bwrap reports a child killed by signal N as 128 + N
        # RLIMIT_CPU ends a busy loop with SIGXCPU: that is a timeout too.
        timed_out = not exited or returncode == -signal.SIGXCPU
        stdout, stderr = _read_capped(out, keep="head"), _read_capped(err, keep="tail")
    success = returncode == 0 and not timed_out
    last_line = next((line for line in reversed(stderr.splitlines()) if line.strip()), None)
    error = (f"timed out after {timeout} s" if timed_out else
             None if success else last_line or f"exited with code {returncode}")
    return ExecutionResult(success=success, stdout=stdout, stderr=stderr, error=error,
                           timeout=timed_out, memory_exceeded="MemoryError" in stderr)
