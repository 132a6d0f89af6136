"""The sandbox for model-generated code: HumanEval's canonical solutions pass, empty bodies fail, and
hostile programs (endless loops, unbounded memory, fork bombs, file deletion, sockets) are stopped and
recorded as failures while the host stays unharmed. Untrusted code only ever runs in the sandbox's
child process, never in this test process."""

import os
import shutil
import socket
import time
from pathlib import Path

import psutil
import pytest

from tunekit.sandbox import SANDBOX_MARKER, Result, check_humaneval, load_humaneval, pass_at_k_report, run_program

IS_ROOT = os.geteuid() == 0


def sandbox_processes(workdir: str = "") -> list[psutil.Process]:
    """Live processes started by the sandbox (their command line names the sandbox's work dir)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if proc.info["status"] != psutil.STATUS_ZOMBIE and SANDBOX_MARKER in cmdline and workdir in cmdline:
            found.append(proc)
    return found


def assert_cleaned_up(result: Result) -> None:
    assert result.workdir and SANDBOX_MARKER in result.workdir
    assert not Path(result.workdir).exists(), "the sandbox's temporary directory was left behind"
    assert sandbox_processes(result.workdir) == [], "a sandboxed process survived"
    assert psutil.Process().children(recursive=True) == []


def assert_layers(result: Result) -> None:
    assert "audit" in result.layers and "rlimits" in result.layers
    if IS_ROOT:  # as root (here and in CI) the kernel layers must all be on
        assert {"netns", "seccomp"} <= set(result.layers)


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


def test_ordinary_work_inside_the_temporary_directory_is_allowed():
    program = """
import os, tempfile, shutil, threading, json
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
for fd in range(3, 20):
    try:
        os.write(fd, line.encode())
    except OSError:
        pass
os._exit(0)
"""
    result = run_program(forge)
    assert not result.passed and result.reason.startswith("crashed: exit code 0")
    assert run_program("import sys\nsys.exit(0)").reason == "failed: SystemExit: 0"


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


@pytest.mark.skipif(not IS_ROOT, reason="the seccomp layer is asserted where the sandbox runs as root (here and CI)")
def test_the_kernel_refuses_forks_even_without_the_audit_hook():
    # Code that got around Python's audit hook (e.g. native code) still cannot create a process.
    result = run_program("import os\nwhile True:\n    os.fork()\n", timeout=5, _audit_hook=False)
    assert result.reason == "failed: PermissionError: [Errno 1] Operation not permitted"
    assert "seccomp" in result.layers and "audit" not in result.layers
    assert_cleaned_up(result)
    threads = run_program("import threading\nt = threading.Thread(target=print)\nt.start(); t.join()\n", _audit_hook=False)
    assert threads.passed, threads.reason  # threads are not processes


def test_ctypes_cannot_be_used_to_get_around_the_hook():
    result = run_program("import ctypes\nctypes.CDLL(None).fork()\n")
    assert result.reason == "failed: ImportError: ctypes is not available in the sandbox"
    assert_cleaned_up(result)


def test_files_outside_the_sandbox_cannot_be_deleted_moved_or_written(tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "file.txt").write_text("keep me too")
    attacks = {
        f"import os\nos.remove({str(sentinel)!r})": "os.remove",
        f"from pathlib import Path\nPath({str(sentinel)!r}).unlink()": "os.remove",
        f"import shutil\nshutil.rmtree({str(tree)!r})": "shutil.rmtree",
        f"import os\nos.rmdir({str(tree / 'sub')!r})": "os.rmdir",
        f"import os\nos.rename({str(sentinel)!r}, 'stolen.txt')": "os.rename",
        f"import shutil\nshutil.move({str(sentinel)!r}, 'stolen.txt')": "shutil.move",
        f"open({str(sentinel)!r}, 'w').write('overwritten')": "open for writing",
        f"open({str(sentinel)!r}, 'a').write('appended')": "open for writing",
        f"import os\nos.open({str(sentinel)!r}, os.O_WRONLY | os.O_TRUNC)": "open for writing",
        f"import os\nos.chdir({str(tmp_path)!r})\nos.remove('sentinel.txt')": "os.remove",
        f"import os\nos.symlink({str(sentinel)!r}, 'link')\nopen('link', 'w').write('through a link')": "open for writing",
        f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\nos.unlink('sentinel.txt', dir_fd=fd)": "os.open of a directory",
    }
    for program, event in attacks.items():
        result = run_program(program, timeout=5)
        assert not result.passed, program
        assert result.reason.startswith(f"forbidden: file ({event}"), (program, result.reason)
        assert_cleaned_up(result)
    assert sentinel.read_text() == "keep me"
    assert (tree / "sub" / "file.txt").read_text() == "keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sentinel.txt", "tree"]
    # The project itself is not writable either.
    project_file = Path(__file__).resolve()
    before = project_file.read_bytes()
    assert run_program(f"open({str(project_file)!r}, 'w')").reason.startswith("forbidden: file")
    assert project_file.read_bytes() == before


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


@pytest.mark.skipif(not IS_ROOT, reason="network namespaces and seccomp need root (here and in CI)")
def test_each_kernel_layer_alone_blocks_the_network(listener):
    port = listener.getsockname()[1]
    program = f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\ns.sendall(b'leak')\n"
    seccomp_only = run_program(program, timeout=5, _audit_hook=False, _netns=False)
    assert seccomp_only.reason == "failed: PermissionError: [Errno 1] Operation not permitted"
    netns_only = run_program(program, timeout=5, _audit_hook=False, _seccomp=False)
    assert netns_only.reason == "failed: OSError: [Errno 101] Network is unreachable"
    assert "netns" in netns_only.layers
    assert_no_connection(listener)


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
    assert sandbox_processes() == []


@pytest.mark.slow
def test_humaneval_all_164_canonical_solutions_pass_and_empty_bodies_do_not():
    problems = load_humaneval()
    assert len(problems) == 164
    started = time.monotonic()
    canonical = check_humaneval(problems, [[p["canonical_solution"]] for p in problems], timeout=15)
    failures = {p["task_id"]: row[0].reason for p, row in zip(problems, canonical) if not row[0].passed}
    assert failures == {}
    assert pass_at_k_report(canonical, [1])["pass@1"] == 1.0
    empty = check_humaneval(problems, [["    pass\n", ""] for _ in problems], timeout=15)
    report = pass_at_k_report(empty, [1, 2])
    assert report["pass@1"] == 0.0 and report["pass@2"] == 0.0
    assert set(report["reasons"]) == {"failed"}
    assert time.monotonic() - started < 120
    assert sandbox_processes() == []
