"""
Hostile programs against the code sandbox (nanochat/execution.py): each test runs one attack a model-written program
could make and asserts it fails. Every attack here worked before the sandbox ran programs in bubblewrap namespaces.
They are skipped, with the reason, only where bwrap is missing or cannot create namespaces (CI installs it): without
isolation several of them would really read secrets or kill processes on the test machine. The last tests hold the
fallback (no bwrap) to what it still promises.
"""

import functools
import os
import platform
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from nanochat import execution
from nanochat.execution import execute_code

BWRAP, PROBLEM = execution._probe_isolation()
isolated = pytest.mark.skipif(BWRAP is None, reason=f"no sandbox isolation here: {PROBLEM}")

SHOW_WORK_DIR = "import os\nprint(os.readlink('/proc/self/cwd'), flush=True)\n"  # first line: the call's marker

def survivors(marker):
    """Live host processes whose command line names `marker` (a call's work dir: bwrap's and the child's argv do)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile
            continue
        if marker.encode() in cmdline and state != "Z" and int(pid) != os.getpid():
            found.append((int(pid), cmdline[:200]))
    return found

def assert_nothing_survives(result):
    work_dir = result.stdout.splitlines()[0]
    assert os.path.basename(work_dir).startswith("nanochat_exec_"), result
    assert survivors(work_dir) == [], "processes outlived the call"

@pytest.fixture
def victim():
    """A host process holding a secret in its environment, like a training run with WANDB_API_KEY set."""
    proc = subprocess.Popen(["sleep", "60"], env={"PATH": "/usr/bin:/bin", "NANOCHAT_VICTIM_SECRET": "hunter2"})
    # Popen returns when exec closes its close-on-exec pipe, which the kernel does before it lays out the new
    # program's environment: until then /proc/PID/environ reads empty (seen once in CI).
    deadline = time.monotonic() + 10
    while not Path(f"/proc/{proc.pid}/environ").read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    yield proc
    proc.kill()
    proc.wait()

@isolated
def test_parent_and_other_environments_unreadable(victim):
    assert b"hunter2" in Path(f"/proc/{victim.pid}/environ").read_bytes()  # what the attack would get
    code = f"""
import os
for pid in [os.getppid(), {os.getpid()}, {victim.pid}] + [p for p in os.listdir('/proc') if p.isdigit()]:
    try:
        print('read', pid, open(f'/proc/{{pid}}/environ', 'rb').read())
    except OSError as e:
        print('refused', pid, type(e).__name__)
"""
    result = execute_code(code)
    assert result.success, result
    assert "hunter2" not in result.stdout
    assert f"refused {victim.pid}" in result.stdout and f"refused {os.getpid()}" in result.stdout

@isolated
def test_no_host_descriptor_leaks_in():
    """Only stdin, stdout and stderr: a leaked pipe such as bwrap's --info-fd, which the parent reads the sandbox init's
    pid from, would let the program hand the parent a pid to kill."""
    result = execute_code("import os\nprint(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))\n")
    assert result.stdout.strip() == "[0, 1, 2, 3]", result  # 3: listdir's own handle on the directory

PROCESS_STARTS = {
    "reload_os_system": "import importlib\nimportlib.reload(os)\nprint('status', os.system('echo escaped'))\n",
    "ctypes_system": "import ctypes\nprint('status', ctypes.CDLL(None).system(b'echo escaped'))\n",
    "posix_spawn": "os.posix_spawn('/usr/bin/echo', ['echo', 'escaped'], {})\n",
    "fork": "import importlib\nimportlib.reload(os)\nif os.fork() == 0:\n    print('escaped')\n",
    "posixsubprocess": "import subprocess, importlib\nimportlib.reload(subprocess)\n"
                       "subprocess.run(['echo', 'escaped'])\n",
}

@isolated
@pytest.mark.parametrize("attack", list(PROCESS_STARTS))
def test_no_process_can_be_started(attack):
    # RLIMIT_NPROC = 0 only binds a non-root uid: as root the sandbox drops to nobody first
    result = execute_code(SHOW_WORK_DIR + PROCESS_STARTS[attack])
    assert "escaped" not in result.stdout, result
    assert_nothing_survives(result)

@isolated
def test_no_new_user_namespace():
    """unshare(CLONE_NEWUSER) would make the program root with every capability in a namespace of its own (kernel
    attack surface: mounts, netfilter); it succeeded before the seccomp filter. Also by raw syscall number, and
    clone3, whose flags the filter cannot read, is refused whole. Other namespaces stay closed as before."""
    numbers = {"x86_64": (272, 435), "aarch64": (97, 435)}.get(platform.machine())
    if numbers is None:
        pytest.skip(f"no seccomp filter on {platform.machine()}")
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"calls = [('libc', lambda: libc.unshare(0x10000000)),\n"
            f"         ('syscall', lambda: libc.syscall({numbers[0]}, 0x10000000)),\n"
            f"         ('clone3', lambda: libc.syscall({numbers[1]}, 0, 0))]\n"
            "for name, call in calls:\n"
            "    print(name, call(), os.strerror(ctypes.get_errno()))\n")
    result = execute_code(code)
    assert result.stdout.splitlines()[:3] == ["libc -1 Operation not permitted", "syscall -1 Operation not permitted",
                                              "clone3 -1 Function not implemented"], result
    assert result.success, result  # the program itself still runs normally

@isolated
def test_fork_bomb_is_bounded():
    code = SHOW_WORK_DIR + """
import importlib
importlib.reload(os)
started = refused = 0
while True:
    try:
        started += os.fork() > 0
    except OSError:
        refused += 1
        if refused == 1000:
            print('refused', refused, 'started', started, flush=True)
"""
    start = time.time()
    result = execute_code(code, timeout=2.0)  # 2 s: the interpreter's start alone took up to 0.9 s on a loaded CI VM
    assert result.timeout, result
    assert time.time() - start < 10, "the call outlived its 2 s timeout by far"
    assert "refused 1000 started 0" in result.stdout, result
    assert_nothing_survives(result)

# The second line of defense: even where a program does start processes (here the test lifts RLIMIT_NPROC), its pid
# namespace ends with it, so forked, setsid'd and fork-bombing children die with the call, on return and on timeout.
ESCAPE = SHOW_WORK_DIR + """
import importlib, time
importlib.reload(os)
for depth in range({depth}):  # a bounded fork bomb: 2 ** depth processes
    os.fork()
if os.getpid() != 2:  # everyone but the program itself (pid 2 under bwrap's init) leaves the group and waits
    os.setsid()
    time.sleep(60)
print('children started', flush=True)
{then}
"""

@isolated
@pytest.mark.parametrize("then", ["pass", "while True:\n    pass"], ids=["return", "timeout"])
def test_started_processes_die_with_the_call(monkeypatch, then):
    monkeypatch.setattr(execution, "_GUARD", execution._GUARD.replace("(resource.RLIMIT_NPROC, 0)",
                                                                      "(resource.RLIMIT_CORE, 0)"))
    result = execute_code(ESCAPE.format(depth=4, then=then), timeout=10.0 if then == "pass" else 3.0)
    assert "children started" in result.stdout, result  # the processes really existed
    assert result.timeout == (then != "pass"), result
    assert_nothing_survives(result)

@isolated
def test_other_processes_cannot_be_killed(victim):
    code = f"""
import importlib, os, signal
importlib.reload(os)
try:
    os.kill({victim.pid}, signal.SIGKILL)
    print('killed')
except OSError as e:
    print('refused', type(e).__name__)
"""
    result = execute_code(code)
    time.sleep(0.1)
    assert "killed" not in result.stdout and victim.poll() is None, result

@isolated
def test_no_network_not_even_localhost():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        port = server.getsockname()[1]
        code = f"""
import socket
for address in [('127.0.0.1', {port}), ('1.1.1.1', 53)]:
    try:
        socket.create_connection(address, timeout=2).close()
        print('connected', address)
    except OSError as e:
        print('refused', address, type(e).__name__)
"""
        result = execute_code(code)
        with pytest.raises(socket.timeout):
            server.accept()
    assert "connected" not in result.stdout and result.stdout.count("refused") == 2, result

@isolated
def test_host_files_unreadable(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    home = Path.home()
    home_files = [str(p) for p in sorted(home.iterdir()) if p.is_file()][:5]
    assert Path("/etc/passwd").read_text()  # readable here, so the test can fail
    code = f"""
import os
for path in ['/etc/passwd', '/etc/shadow', {str(secret)!r}] + {home_files!r}:
    try:
        print('read', path, open(path).read()[:20])
    except OSError as e:
        print('refused', path, type(e).__name__)
for path in [{str(home)!r}, {str(tmp_path)!r}, '/']:
    try:
        print('listed', path, os.listdir(path))
    except OSError as e:
        print('refused', path, type(e).__name__)
"""
    result = execute_code(code)
    assert result.success, result
    assert "read " not in result.stdout and "hunter2" not in result.stdout, result
    assert f"refused {home}" in result.stdout and f"refused {tmp_path}" in result.stdout, result
    listed_root = [line for line in result.stdout.splitlines() if line.startswith("listed /")]
    assert listed_root and "'etc'" not in listed_root[0] and "'home'" not in listed_root[0], result

@isolated
def test_writes_outside_the_work_dir_fail(tmp_path):
    name = f"escape_{uuid.uuid4().hex}"
    targets = [str(tmp_path), str(Path.home()), "/tmp", "/var/tmp", os.getcwd()]
    code = f"""
chunk = b'x' * (10 << 20)
for directory in {targets!r}:
    written = 0
    try:
        for i in range(6):  # 60 MB in files under the 16 MiB per-file limit
            with open(f'{{directory}}/{name}_{{i}}', 'wb') as f:
                f.write(chunk)
            written += len(chunk)
    except OSError as e:
        print('refused', directory, type(e).__name__)
    print('wrote', directory, written)
inside = 0
try:
    for i in range(8):  # the work dir takes writes, up to its 64 MiB
        with open(f'inside_{{i}}', 'wb') as f:
            f.write(chunk)
        inside += len(chunk)
except OSError as e:
    print('inside stopped', type(e).__name__)
print('inside', inside)
"""
    result = execute_code(code, timeout=10.0)
    for directory in targets:
        assert f"wrote {directory} 0" in result.stdout, result
        assert not list(Path(directory).glob(f"{name}*")), f"the program wrote into {directory}"
    inside = int(result.stdout.split("inside ")[-1])
    assert 10 << 20 <= inside <= execution.MAX_WORK_BYTES, result

@isolated
def test_parent_output_cannot_be_opened():
    code = f"""
import os
for pid in [os.getppid(), {os.getpid()}]:
    try:
        open(f'/proc/{{pid}}/fd/1', 'w').close()
        print('opened', pid)
    except OSError as e:
        print('refused', pid, type(e).__name__)
"""
    result = execute_code(code)
    assert "opened" not in result.stdout and result.stdout.count("refused") == 2, result

def test_without_isolation_the_process_group_dies_with_the_call(monkeypatch):
    # the fallback's promise: its process group is killed on return too (as root a fork succeeds there)
    monkeypatch.setattr(execution, "_isolation", lambda: None)
    code = SHOW_WORK_DIR + "import importlib, time\nimportlib.reload(os)\nif os.fork() == 0:\n    time.sleep(60)\n"
    result = execute_code(code)
    assert_nothing_survives(result)

def python_nobody_can_start():
    """This Python if uid nobody can start it, else Debian's system Python if that works, else None."""
    for python in [execution.sys.executable, "/usr/bin/python3"]:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(execution.sys, "executable", python)
            if os.path.exists(python) and execution._can_drop_privileges.__wrapped__():
                return python
    return None

@pytest.mark.skipif(os.geteuid() != 0, reason="the root fallback: needs root")
def test_without_isolation_root_still_runs_the_program_as_nobody(monkeypatch, victim):
    python = python_nobody_can_start()
    if python is None:
        pytest.skip("no Python here that uid nobody can start (the fallback then runs programs as root, and says so)")
    monkeypatch.setattr(execution, "_isolation", lambda: None)
    monkeypatch.setattr(execution.sys, "executable", python)
    monkeypatch.setattr(execution, "_can_drop_privileges", functools.cache(execution._can_drop_privileges.__wrapped__))
    code = SHOW_WORK_DIR + f"""import importlib, signal
importlib.reload(os)
print('uid', os.getuid())
print('status', os.system('echo escaped'))
for path in ['/proc/{victim.pid}/environ', '/proc/{os.getpid()}/fd/1']:
    try:
        print('read', path, open(path, 'rb').read(100))
    except OSError as e:
        print('refused', path, type(e).__name__)
try:
    os.kill({victim.pid}, signal.SIGKILL)
except OSError as e:
    print('refused kill', type(e).__name__)
open('mine.txt', 'w').write('the work dir stays writable')
"""
    result = execute_code(code)
    assert result.success, result
    assert "uid 65534" in result.stdout and "escaped" not in result.stdout, result
    assert "read " not in result.stdout and "hunter2" not in result.stdout, result
    assert "refused kill PermissionError" in result.stdout and victim.poll() is None, result
    assert_nothing_survives(result)
