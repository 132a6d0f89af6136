"""The sandbox for model-generated code: HumanEval's canonical solutions pass, empty bodies fail, and
hostile programs (endless loops, unbounded memory, fork bombs, file deletion, sockets) are stopped and
recorded as failures while the host stays unharmed. Every bypass of the audit-hook-only sandbox
(issue 14) is replayed here, directly and as a HumanEval completion, and must do no damage; each
kernel layer is also shown to hold with the audit hook switched off. Untrusted code only ever runs in
the sandbox, never in this test process."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tunekit.sandbox import (SANDBOX_MARKER, SANDBOX_UID, Result, SandboxUnavailable, check_humaneval,
                             load_humaneval, pass_at_k_report, run_program)

IS_ROOT = os.geteuid() == 0
PROJECT = Path(__file__).resolve().parents[2]
KERNEL_LAYERS = {"nobody", "mntns", "pidns", "netns", "ipcns", "utsns", "disk", "rlimits", "seccomp"}
EROFS = "[Errno 30] Read-only file system"


def sandbox_processes(workdir: str) -> list[psutil.Process]:
    """Live processes of one sandbox run (bwrap's command line names its working directory)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if proc.info["status"] != psutil.STATUS_ZOMBIE and workdir in cmdline:
            found.append(proc)
    return found


def assert_cleaned_up(result: Result) -> None:
    assert result.workdir.startswith(f"/tmp/{SANDBOX_MARKER}-")
    assert not Path(result.workdir).exists(), "the sandbox's private tmpfs showed up on the host"
    assert sandbox_processes(result.workdir) == [], "a sandboxed process survived"
    assert psutil.Process().children(recursive=True) == []


def assert_layers(result: Result, *, audit: bool = True) -> None:
    expected = KERNEL_LAYERS | ({"audit"} if audit else set()) | (set() if IS_ROOT else {"userns"})
    assert expected <= set(result.layers), result.layers
    if IS_ROOT:  # as root no user namespace: the runner is the host's real nobody instead of root mapped
        assert "userns" not in result.layers


# ---------------------------------------------------------------- basics


def test_a_program_passes_or_fails_with_its_exception_recorded():
    ok = run_program("import math\nassert math.sqrt(16) == 4\n")
    assert ok.passed and ok.reason == "passed"
    assert_layers(ok)
    assert_cleaned_up(ok)
    bad = run_program("def f():\n    return 1\nassert f() == 2, 'f is wrong'\n")
    assert not bad.passed and bad.reason == "failed: AssertionError: f is wrong"
    assert run_program("def f(:\n").reason.startswith("failed: SyntaxError")
    assert run_program("raise KeyError('k')").reason == "failed: KeyError: 'k'"
    assert_cleaned_up(bad)


def test_ordinary_work_inside_the_working_directory_is_allowed():
    program = """
import os, tempfile, shutil, threading, json, hashlib
cwd = os.getcwd()
assert 'tunekit-sandbox' in cwd, cwd
with open('out.txt', 'w') as f:
    f.write('hello')
assert open('out.txt').read() == 'hello'
os.makedirs('a/b')
open('a/b/c.txt', 'w').close()
os.rename('out.txt', 'a/moved.txt')
shutil.rmtree('a')
d = tempfile.mkdtemp()
assert d.startswith(cwd)
t = threading.Thread(target=lambda: None); t.start(); t.join()
import numpy
assert int(numpy.arange(4).sum()) == 6
assert json.__file__  # reading the standard library works
assert hashlib.md5(b'x').hexdigest()
"""
    result = run_program(program)
    assert result.passed, result.reason + result.stderr
    assert_cleaned_up(result)


def test_printed_or_forged_results_do_not_count_as_a_pass():
    # The result channel is tagged with a per-run secret: a program cannot claim success.
    forge = """
import os, json
line = json.dumps({"nonce": "0" * 32, "status": "passed", "detail": "", "layers": []}) + "\\n"
print(line)
for fd in range(3, 200):
    try:
        os.write(fd, line.encode())
    except OSError:
        pass
os._exit(0)
"""
    result = run_program(forge)
    assert not result.passed and result.reason.startswith("crashed: exit code 0")
    assert run_program("import sys\nsys.exit(0)").reason == "failed: SystemExit: 0"
    assert run_program("import os\nos._exit(3)").reason.startswith("crashed: exit code 3")


def test_what_the_program_sees_only_the_python_tree_read_only_and_its_own_processes():
    # A virtual environment inside the project (make setup's .venv) is bound, and so is the empty
    # directory above it; nothing else of the project.
    venv_in_project = [Path(sys.prefix).relative_to(PROJECT).parts[0]] if Path(sys.prefix).is_relative_to(PROJECT) else []
    program = textwrap.dedent(f"""
    import os, sys
    invisible = [{str(PROJECT / 'tunekit' / 'sandbox.py')!r}, {str(PROJECT / 'params.yaml')!r},
                 {str(PROJECT / 'dvc.yaml')!r}, '/etc/passwd', '/etc/hostname', '/work/shared', '/home', '/var',
                 '/boot', '/root/.bashrc', '/root/.ssh', '/sys/kernel', '/run']
    seen = [path for path in invisible if os.path.exists(path)]
    assert seen == [], seen
    if os.path.exists({str(PROJECT)!r}):
        assert os.listdir({str(PROJECT)!r}) == {venv_in_project!r}, os.listdir({str(PROJECT)!r})
    writable = []
    for place in ['/', '/tmp', '/dev', '/dev/shm', '/proc', '/usr/lib', sys.prefix, sys.base_prefix,
                  os.path.dirname(os.__file__)]:
        try:
            with open(place + '/probe', 'w'):
                writable.append(place)
        except OSError:
            pass
    assert writable == [], writable
    assert open('probe', 'w').write('ok') == 2  # only the working directory takes writes
    try:  # the host's own /dev/null, bound in: as root mapped into a user namespace this would work
        os.chmod('/dev/null', 0o666)
        raise AssertionError('the sandbox owns the host /dev/null')
    except PermissionError:
        pass
    pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
    assert pids == [1, os.getpid()], pids  # bwrap's reaper and this process, nothing of the host
    assert os.getresuid() == ({SANDBOX_UID},) * 3 and os.getresgid() == ({SANDBOX_UID},) * 3
    caps = dict(line.split(':\\t') for line in open('/proc/self/status').read().splitlines() if line.startswith('Cap'))
    assert int(caps['CapEff'], 16) == 0 and int(caps['CapPrm'], 16) == 0, caps
    assert open('/proc/self/status').read().split('NoNewPrivs:')[1].split()[0] == '1'
    assert sorted(os.environ) == ['HOME', 'LANG', 'LC_ALL', 'PATH', 'PWD', 'TMPDIR'], sorted(os.environ)
    assert os.environ['HOME'] == os.getcwd()
    assert os.uname().nodename == 'tunekit-sandbox'
    interfaces = [line.split(':')[0].strip() for line in open('/proc/net/dev').read().splitlines()[2:]]
    assert interfaces == ['lo'], interfaces
    """)
    result = run_program(program, _audit_hook=False)  # what the kernel shows, not what the hook allows
    assert result.passed, result.reason + result.stderr
    assert_layers(result, audit=False)
    assert_cleaned_up(result)


# ---------------------------------------------------------------- hostile programs


def test_an_endless_loop_is_killed_at_the_wall_clock_timeout():
    started = time.monotonic()
    result = run_program("while True:\n    pass\n", timeout=1.5)
    elapsed = time.monotonic() - started
    assert not result.passed and result.reason == "timeout"
    assert 1.4 < elapsed < 6
    assert_cleaned_up(result)
    sleeper = run_program("import time\nwhile True:\n    time.sleep(1)\n", timeout=1.0)
    assert sleeper.reason == "timeout"  # no CPU used: only the wall clock catches it
    assert_cleaned_up(sleeper)


def test_the_cpu_time_limit_stops_a_busy_loop_before_the_wall_clock():
    result = run_program("while True:\n    pass\n", timeout=30, cpu_seconds=1)
    assert result.reason == "timeout" and result.duration_s < 10
    assert_cleaned_up(result)


@pytest.mark.parametrize("program", [
    "blocks = []\nwhile True:\n    blocks.append(bytearray(10 ** 7))\n",
    "x = bytearray(1 << 40)\n",
    "s = 'x' * (1 << 33)\n",
    "x = bytearray(50 * 10 ** 9)\n",
])
def test_unbounded_memory_is_stopped_by_the_memory_limit(program):
    result = run_program(program, timeout=20, memory_mb=256)
    assert not result.passed and result.reason == "memory"
    assert_layers(result)
    assert_cleaned_up(result)


@pytest.mark.parametrize("program", [
    "import os\nwhile True:\n    os.fork()\n",
    "import multiprocessing\ndef f():\n    while True: pass\nfor _ in range(100):\n    multiprocessing.Process(target=f).start()\n",
    "import subprocess\nsubprocess.Popen(['sleep', '100'])\n",
    "import os\nos.system('sleep 100 &')\n",
    "import os\nos.execv('/bin/sh', ['sh', '-c', 'sleep 100'])\n",
    "import os, signal\nos.kill(1, signal.SIGTERM)\n",
])
def test_fork_bombs_and_process_creation_are_forbidden(program):
    result = run_program(program, timeout=5)
    assert not result.passed and result.reason.startswith("forbidden: process"), result.reason
    assert_cleaned_up(result)


def test_the_kernel_refuses_forks_even_without_the_audit_hook():
    # Code that got around Python's audit hook (e.g. native code) still cannot create a process.
    result = run_program("import os\nwhile True:\n    os.fork()\n", timeout=5, _audit_hook=False)
    assert result.reason == "failed: PermissionError: [Errno 1] Operation not permitted"
    assert_layers(result, audit=False)
    assert "audit" not in result.layers
    assert_cleaned_up(result)
    threads = run_program("import threading\nt = threading.Thread(target=print)\nt.start(); t.join()\n", _audit_hook=False)
    assert threads.passed, threads.reason  # threads are not processes
    signals = run_program("import os, signal\nos.kill(1, signal.SIGKILL)\n", _audit_hook=False)
    assert signals.reason == "failed: PermissionError: [Errno 1] Operation not permitted"


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers of x86-64")
def test_the_kernel_refuses_keyrings_bpf_perf_userfaultfd_and_io_uring():
    # Without the hook, ctypes reaches the syscalls directly: seccomp answers EPERM to each.
    calls = {"add_key": 248, "keyctl": 250, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
             "io_uring_setup": 425, "fsopen": 430}
    program = textwrap.dedent(f"""
    import ctypes, errno
    libc = ctypes.CDLL(None, use_errno=True)
    answers = {{}}
    for name, number in {calls!r}.items():
        ctypes.set_errno(0)
        answers[name] = (libc.syscall(number, 0, 0, 0, 0, 0), ctypes.get_errno())
    assert answers == {{name: (-1, errno.EPERM) for name in answers}}, answers
    assert libc.syscall(39) > 0  # getpid: ordinary calls still work
    """)
    result = run_program(program, _audit_hook=False)
    assert result.passed, result.reason


def test_open_files_threads_and_file_sizes_are_capped():
    files = run_program("handles = [open(f'f{i}', 'w') for i in range(200)]\n", _audit_hook=False)
    assert files.reason.startswith("failed: OSError: [Errno 24] Too many open files"), files.reason
    threads = run_program("import threading, time\nfor _ in range(5000):\n"
                          "    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n", timeout=20)
    assert threads.reason == "failed: RuntimeError: can't start new thread", threads.reason
    big = run_program("open('big.bin', 'wb').write(b'x' * (17 << 20))\n", fsize_mb=16)
    assert big.reason == "failed: OSError: [Errno 27] File too large", big.reason  # Python ignores SIGXFSZ
    # stderr is the one host file the program writes to (kept for the result): the same cap holds
    chatty = run_program("import sys\nfor _ in range(40):\n    sys.stderr.write('x' * (1 << 20))\n    sys.stderr.flush()\n",
                         fsize_mb=16)
    assert chatty.reason == "failed: OSError: [Errno 27] File too large", chatty.reason
    assert_cleaned_up(big)


def test_ctypes_cannot_be_used_to_get_around_the_hook():
    result = run_program("import ctypes\nctypes.CDLL(None).fork()\n")
    assert result.reason == "failed: ImportError: ctypes is not available in the sandbox"
    assert_cleaned_up(result)


def world_writable(root: Path) -> None:
    """So that only the sandbox's read-only mount, not file permissions, stands between nobody and `root`."""
    for path in [root, *root.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o666)


def test_files_outside_the_sandbox_cannot_be_deleted_moved_or_written(tmp_path):
    # tmp_path is shown to the sandbox read-only (by default it would not be there at all): each
    # attack is stopped by the audit hook and, with the hook off, by the read-only mount.
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "file.txt").write_text("keep me too")
    world_writable(tmp_path)
    attacks = {
        f"import os\nos.remove({str(sentinel)!r})": "os.remove",
        f"from pathlib import Path\nPath({str(sentinel)!r}).unlink()": "os.remove",
        f"import shutil\nshutil.rmtree({str(tree)!r})": "shutil.rmtree",
        f"import os\nos.rmdir({str(tree / 'sub')!r})": "os.rmdir",
        f"import os\nos.rename({str(sentinel)!r}, {str(tmp_path / 'stolen.txt')!r})": "os.rename",
        f"import os\nos.chmod({str(sentinel)!r}, 0)": "os.chmod",
        f"open({str(sentinel)!r}, 'w').write('overwritten')": "open for writing",
        f"open({str(sentinel)!r}, 'a').write('appended')": "open for writing",
        f"import os\nos.open({str(sentinel)!r}, os.O_WRONLY | os.O_TRUNC)": "open for writing",
        f"import os\nos.chdir({str(tmp_path)!r})\nos.remove('sentinel.txt')": "os.remove",
        f"import os\nos.symlink({str(sentinel)!r}, 'link')\nopen('link', 'w').write('through a link')": "open for writing",
        f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\nos.unlink('sentinel.txt', dir_fd=fd)": "os.open of a directory",
    }
    for program, event in attacks.items():
        result = run_program(program, timeout=5, _extra_readonly=[str(tmp_path)])
        assert not result.passed, program
        assert result.reason.startswith(f"forbidden: file ({event}"), (program, result.reason)
        assert_cleaned_up(result)
        kernel = run_program(program, timeout=5, _audit_hook=False, _extra_readonly=[str(tmp_path)])
        assert kernel.reason.startswith("failed: ") and EROFS in kernel.reason, (program, kernel.reason)
    assert sentinel.read_text() == "keep me"
    assert (tree / "sub" / "file.txt").read_text() == "keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sentinel.txt", "tree"]
    # The project itself is not writable either: it is not even there.
    project_file = Path(__file__).resolve()
    before = project_file.read_bytes()
    assert run_program(f"open({str(project_file)!r}, 'w')").reason.startswith("forbidden: file")
    hookless = run_program(f"open({str(project_file)!r}, 'w')", _audit_hook=False)
    assert hookless.reason.startswith("failed: FileNotFoundError"), hookless.reason
    assert project_file.read_bytes() == before


# ---------------------------------------------------------------- the bypasses of issue 14

# Each payload attacks `target` (a directory on the host holding sentinel.txt). All of them escaped
# the audit-hook-only sandbox while the program was scored passed (checked against main's
# tunekit/sandbox.py when these tests were written).


def payload_dir_fd(target: Path) -> str:
    # the hook resolves a relative path against the current directory and ignores dir_fd
    return textwrap.dedent(f"""
    import os
    work = os.getcwd()
    os.makedirs('a/b/c/d/e/f/g/h/i/j/k/l')
    os.chdir('a/b/c/d/e/f/g/h/i/j/k/l')
    top = os.open(work, os.O_RDONLY)
    rel = os.path.relpath({str(target / 'sentinel.txt')!r}, work)
    fd = os.open(rel, os.O_WRONLY | os.O_TRUNC | os.O_CREAT, dir_fd=top)
    os.write(fd, b'overwritten')
    """)


def payload_audit_thread(target: Path) -> str:
    # a second thread inside the hook used to switch the hook off for every thread
    return textwrap.dedent(f"""
    import os, sys, threading
    stop = []
    def spam():
        while not stop:
            sys.audit('tunekit.noise')
    threading.Thread(target=spam, daemon=True).start()
    try:
        for _ in range(20000):
            try:
                os.remove({str(target / 'sentinel.txt')!r})
                break
            except FileNotFoundError:
                raise
    finally:
        stop.append(1)
    """)


def payload_gc_closure(target: Path) -> str:
    # the hook's closure, found through gc, rewritten so that every absolute path counts as inside
    return textwrap.dedent(f"""
    import gc, os
    patched = 0
    for obj in gc.get_objects():
        if type(obj).__name__ == 'function' and obj.__name__ in ('hook', 'inside') and obj.__closure__:
            for cell in obj.__closure__:
                if isinstance(cell.cell_contents, str) and cell.cell_contents.startswith('/'):
                    cell.cell_contents = ''
                    patched += 1
    assert patched, 'the hook was not found'
    os.remove({str(target / 'sentinel.txt')!r})
    """)


def payload_sqlite(target: Path) -> str:
    # SQLite opens its files in C: no audit event at all
    return textwrap.dedent(f"""
    import sqlite3
    db = sqlite3.connect({str(target / 'existing.sqlite')!r})
    db.execute('drop table t')
    db.commit()
    db = sqlite3.connect({str(target / 'x.sqlite')!r})
    db.execute('create table if not exists t (x)')
    db.commit()
    """)


BYPASSES = {"dir_fd": payload_dir_fd, "audit_thread": payload_audit_thread, "gc_closure": payload_gc_closure,
            "sqlite": payload_sqlite}


@pytest.fixture
def target(tmp_path):
    import sqlite3

    (tmp_path / "sentinel.txt").write_text("keep me")
    with sqlite3.connect(tmp_path / "existing.sqlite") as db:
        db.execute("create table t (x)")
        db.execute("insert into t values ('kept')")
    db.close()
    world_writable(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    yield tmp_path
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before, "a file outside the sandbox changed"


@pytest.mark.parametrize("name", sorted(BYPASSES))
def test_the_bypasses_of_the_audit_hook_do_no_damage(name, target):
    payload = BYPASSES[name](target)
    default = run_program(payload, timeout=20)  # the target is not even visible
    assert not default.passed, default.reason
    assert default.reason.startswith(("failed: FileNotFoundError", "failed: OperationalError", "forbidden: file")), default.reason
    assert_cleaned_up(default)
    # Shown read-only, and with the audit hook off: the mount alone stops the write.
    visible = run_program(payload, timeout=20, _audit_hook=False, _extra_readonly=[str(target)])
    assert not visible.passed
    refusal = "attempt to write a readonly database" if name == "sqlite" else EROFS
    assert refusal in visible.reason, visible.reason
    assert_layers(visible, audit=False)
    hooked = run_program(payload, timeout=20, _extra_readonly=[str(target)])
    assert not hooked.passed, hooked.reason
    if name == "audit_thread":  # re-entrancy is per thread now: the hook itself catches this one
        assert hooked.reason == f"forbidden: file (os.remove {target / 'sentinel.txt'})"


def humaneval_completion_with(payload: str, problem: dict) -> str:
    """HumanEval/0's canonical body, then the payload at top level, its failures hidden so the tests still pass."""
    return problem["canonical_solution"] + "\n\ntry:\n" + textwrap.indent(payload, "    ") + "\nexcept Exception:\n    pass\n"


def test_the_bypasses_through_check_humaneval_do_no_damage(target):
    problem = load_humaneval(limit=1)[0]
    completions = [humaneval_completion_with(make(target), problem) for make in BYPASSES.values()]
    control = [problem["canonical_solution"] + "\n\ntry:\n    open('inside.txt', 'w').write('fine')\nexcept Exception:\n    raise\n"]
    results = check_humaneval([problem], [completions + control], timeout=20)[0]
    reasons = dict(zip(list(BYPASSES) + ["control"], [r.reason for r in results]))
    # What is left is a program that passed its tests and did nothing outside: the target fixture
    # checks byte for byte that nothing changed. The hook still names the thread race.
    assert reasons == {"dir_fd": "passed", "audit_thread": f"forbidden: file (os.remove {target / 'sentinel.txt'})",
                       "gc_closure": "passed", "sqlite": "passed", "control": "passed"}, reasons
    assert psutil.Process().children(recursive=True) == []


SECRET_PROBE = """
import json, os, sys
from tunekit.sandbox import check_humaneval, load_humaneval, run_program
secret, parent = os.environ["TUNEKIT_TEST_SECRET"], os.getpid()
payload = '''
import os
found = []
for pid in [PARENT] + [p for p in os.listdir('/proc') if p.isdigit()]:
    for what in ('environ', 'cmdline'):
        try:
            with open(f'/proc/{pid}/{what}', 'rb') as f:
                if SECRET.encode() in f.read():
                    found.append(f'{pid}/{what}')
        except OSError:
            pass
if SECRET in str(os.environ):
    found.append('os.environ')
assert not found, found
'''.replace('PARENT', repr(str(parent))).replace('SECRET', repr(secret))
direct = run_program(payload, _audit_hook=False)
problem = load_humaneval(limit=1)[0]
scored = check_humaneval([problem], [[problem["canonical_solution"] + "\\n" + payload]])[0][0]
print(json.dumps([direct.reason, scored.reason]))
"""


def test_no_secret_of_the_parent_environment_is_readable():
    # /proc/<pid>/environ holds a process's environment as it was started: so the secret goes into a
    # fresh parent process's environment, and that parent runs the sandbox.
    secret = "tunekit-secret-" + os.urandom(8).hex()
    env = {**os.environ, "TUNEKIT_TEST_SECRET": secret}
    done = subprocess.run([sys.executable, "-c", SECRET_PROBE], env=env, cwd=PROJECT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["passed", "passed"]


DISK_PAYLOAD = """
import errno, os
total, error = 0, None
block = b'x' * (1 << 20)
try:
    for i in range(64):
        with open(f'big{i}.bin', 'wb') as f:
            for _ in range(16):
                f.write(block)
                f.flush()
                total += len(block)
except OSError as e:
    error = e.errno
assert error == errno.ENOSPC and total <= 64 << 20, (error, total)
"""


def test_total_disk_use_is_capped():
    # 64 files of 16 MB each (1 GiB) were allowed; the working directory now holds at most disk_mb.
    result = run_program(DISK_PAYLOAD, timeout=30, _audit_hook=False)
    assert result.passed, result.reason + result.stderr
    problem = load_humaneval(limit=1)[0]
    unbounded = DISK_PAYLOAD.replace("except OSError as e:\n    error = e.errno", "finally:\n    pass")
    scored = check_humaneval([problem], [[problem["canonical_solution"] + "\n" + unbounded]], timeout=30)[0][0]
    assert scored.reason == "failed: OSError: [Errno 28] No space left on device", scored.reason
    small = run_program(DISK_PAYLOAD.replace("64 << 20", "8 << 20"), timeout=30, disk_mb=8)
    assert small.passed, small.reason


# ---------------------------------------------------------------- the network


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.5)
    yield server
    server.close()


def assert_no_connection(server):
    with pytest.raises(socket.timeout):
        connection, _ = server.accept()
        connection.close()


def test_sockets_are_forbidden_and_nothing_reaches_a_local_listener(listener):
    port = listener.getsockname()[1]
    # Control: the listener works, a plain connection from this process gets through.
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    connection, _ = listener.accept()
    connection.close()

    programs = [
        f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\ns.sendall(b'leak')\n",
        f"import socket\nsocket.create_connection(('127.0.0.1', {port})).sendall(b'leak')\n",
        f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)\n",
    ]
    for program in programs:
        result = run_program(program, timeout=5)
        assert not result.passed and result.reason.startswith("forbidden: socket"), result.reason
        assert_cleaned_up(result)
    assert_no_connection(listener)


def test_each_kernel_layer_alone_blocks_the_network(listener):
    port = listener.getsockname()[1]
    program = f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\ns.sendall(b'leak')\n"
    seccomp_only = run_program(program, timeout=5, _audit_hook=False, _netns=False)
    assert seccomp_only.reason == "failed: PermissionError: [Errno 1] Operation not permitted"
    assert "netns" not in seccomp_only.layers
    netns_only = run_program(program, timeout=5, _audit_hook=False, _seccomp=False)
    # the namespace's own loopback (bwrap brings it up) has no listener; nothing else is routed
    assert netns_only.reason == "failed: ConnectionRefusedError: [Errno 111] Connection refused", netns_only.reason
    assert "netns" in netns_only.layers and "seccomp" not in netns_only.layers
    outside = run_program("import socket\nsocket.create_connection(('192.0.2.1', 80), timeout=2)\n", timeout=5,
                          _audit_hook=False, _seccomp=False)
    assert outside.reason == "failed: OSError: [Errno 101] Network is unreachable", outside.reason
    assert_no_connection(listener)


# ---------------------------------------------------------------- the sandbox's own life


def test_the_sandbox_dies_with_the_process_that_started_it():
    parent = subprocess.Popen([sys.executable, "-c", "from tunekit.sandbox import run_program\n"
                               "run_program('while True:\\n    pass\\n', timeout=120)\n"], cwd=PROJECT)
    try:
        deadline = time.monotonic() + 30
        sandboxed: list[psutil.Process] = []
        while time.monotonic() < deadline and len(sandboxed) < 2:
            time.sleep(0.2)
            sandboxed = psutil.Process(parent.pid).children(recursive=True)
        assert len(sandboxed) >= 2, sandboxed  # bwrap and what runs inside it
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        _gone, alive = psutil.wait_procs(sandboxed, timeout=10)
        assert alive == [], alive
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_without_bwrap_the_sandbox_refuses_and_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match=r"needs bubblewrap.*apt-get install bubblewrap"):
        run_program("pass")
    problem = load_humaneval(limit=1)[0]
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        check_humaneval([problem], [[problem["canonical_solution"]]])
    # Ubuntu 22.04's bubblewrap (0.6.1) lacks --size and --disable-userns: refused by name, not by a bwrap usage error.
    old = tmp_path / "bwrap"
    old.write_text("#!/bin/sh\necho 'bubblewrap 0.6.1'\n")
    old.chmod(0o755)
    with pytest.raises(SandboxUnavailable, match=r"bubblewrap 0\.6\.1; the sandbox needs 0\.8\.0 or later"):
        run_program("pass")
    assert psutil.Process().children(recursive=True) == []


@pytest.mark.skipif(not IS_ROOT or shutil.which("bwrap") is None, reason="builds an outer namespace as root")
def test_when_user_namespaces_are_refused_the_sandbox_refuses_to_run():
    # An outer bwrap that forbids further user namespaces: the unprivileged path cannot build its own.
    outer = ["bwrap", "--unshare-user", "--disable-userns", "--uid", "1000", "--gid", "1000", "--bind", "/", "/",
             "--dev", "/dev", "--proc", "/proc", "--chdir", str(PROJECT), "--", sys.executable, "-c",
             "from tunekit.sandbox import SandboxUnavailable, run_program\n"
             "try:\n    run_program('pass')\nexcept SandboxUnavailable as error:\n    print(error)\n"]
    done = subprocess.run(outer, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("the sandbox did not start (bwrap exit code 1): 'bwrap: Creating new namespace failed")
    assert "user namespaces" in done.stdout and "apt-get install bubblewrap" in done.stdout


UNPRIVILEGED_PROBE = """
import json
from tunekit.sandbox import run_program
results = [run_program(p, _audit_hook=False) for p in (
    "import os\\nassert os.getuid() == 65534\\nimport numpy",
    "open('/usr/lib/probe', 'w')",
    "import os\\nos.fork()",
    "x = bytearray(1 << 40)",
)]
print(json.dumps([[r.reason, sorted(r.layers)] for r in results]))
"""


def unshare_maps_users() -> bool:
    if shutil.which("unshare") is None:
        return False
    return "--map-user" in subprocess.run(["unshare", "--help"], capture_output=True, text=True).stdout


@pytest.mark.skipif(not IS_ROOT or not unshare_maps_users(), reason="plays a non-root user with unshare as root")
def test_as_a_user_other_than_root_the_sandbox_uses_a_user_namespace():
    # What a developer's machine does: bwrap runs unprivileged and builds a user namespace.
    done = subprocess.run(["unshare", "--user", "--map-user=1000", "--map-group=1000", "--pid", "--fork",
                           "--mount-proc", sys.executable, "-c", UNPRIVILEGED_PROBE],
                          cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (ok, layers), (readonly, _), (fork, _), (memory, _) = json.loads(done.stdout.strip().splitlines()[-1])
    assert ok == "passed" and {"userns", "nobody", "mntns", "pidns", "netns", "seccomp"} <= set(layers), layers
    assert readonly == f"failed: OSError: {EROFS}: '/usr/lib/probe'"
    assert fork == "failed: PermissionError: [Errno 1] Operation not permitted"
    assert memory == "memory"


# ---------------------------------------------------------------- HumanEval


def test_load_humaneval_reads_the_installed_package_file():
    problems = load_humaneval()
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0" and problems[-1]["task_id"] == "HumanEval/163"
    assert {"task_id", "prompt", "canonical_solution", "test", "entry_point"} <= set(problems[0])
    assert [p["task_id"] for p in load_humaneval(limit=3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


def test_humaneval_sample_canonical_pass_empty_bodies_fail_and_report():
    problems = load_humaneval(limit=6)
    completions = [[p["canonical_solution"], "    pass\n", "", "    while True:\n        pass\n"] for p in problems]
    results = check_humaneval(problems, completions, timeout=2)
    assert [[r.passed for r in row] for row in results] == [[True, False, False, False]] * len(problems)
    assert all(row[1].reason.startswith("failed: ") and row[2].reason.startswith("failed: ") for row in results)
    assert all(row[3].reason == "timeout" for row in results)
    report = pass_at_k_report(results, [1, 2, 4])
    assert report["pass@1"] == pytest.approx(0.25)
    assert report["pass@2"] == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert report["pass@4"] == pytest.approx(1.0)
    assert report["problems"] == 6 and report["samples"] == 24 and report["passed"] == 6
    assert report["reasons"] == {"failed": 12, "passed": 6, "timeout": 6}
    with pytest.raises(ValueError, match="pass@5 needs at least 5 samples"):
        pass_at_k_report(results, [5])
    assert psutil.Process().children(recursive=True) == []


@pytest.mark.slow
def test_humaneval_all_164_canonical_solutions_pass_and_empty_bodies_do_not():
    problems = load_humaneval()
    assert len(problems) == 164
    started = time.monotonic()
    canonical = check_humaneval(problems, [[p["canonical_solution"]] for p in problems], timeout=15)
    failures = {p["task_id"]: row[0].reason for p, row in zip(problems, canonical) if not row[0].passed}
    assert failures == {}
    assert pass_at_k_report(canonical, [1])["pass@1"] == 1.0
    assert all(KERNEL_LAYERS <= set(row[0].layers) for row in canonical)
    empty = check_humaneval(problems, [["    pass\n", ""] for _ in problems], timeout=15)
    report = pass_at_k_report(empty, [1, 2])
    assert report["pass@1"] == 0.0 and report["pass@2"] == 0.0
    assert set(report["reasons"]) == {"failed"}
    assert time.monotonic() - started < 120
    assert psutil.Process().children(recursive=True) == []
