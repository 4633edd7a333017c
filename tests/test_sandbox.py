"""The sandbox against hostile programs: each returns within its timeout plus a few seconds, does not pass,
and leaves the machine (files outside its directory, the test process, stray processes) untouched.

Tests marked ``both`` run with the uid switch (when root) and without it (``isolate_user=False``): the
latter checks what the guard and the limits alone catch. Bypasses of the guard (``posix``, ``_io``,
``ctypes``) are only run where the uid switch protects the machine: as root without it they would really
kill this process or overwrite the file.
"""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

import pytest

from harness.evaluation.sandbox import SandboxResult, run_program, run_programs

ROOT = os.geteuid() == 0
SLACK = 5.0  # seconds allowed beyond the timeout (interpreter start, cleanup, a loaded 2-core machine)
both = pytest.mark.parametrize("isolate_user", [True, False], ids=["own-uid", "same-uid"])
isolated_only = pytest.mark.skipif(not ROOT, reason="the uid switch needs root; without it a bypass is real")


def run(source: str, timeout: float = 3.0, **kwargs) -> SandboxResult:
    result = run_program(textwrap.dedent(source), timeout, **kwargs)
    assert result.seconds < timeout + SLACK, result
    return result


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# --- ordinary programs -------------------------------------------------------------------------------


def test_passing_program_passes_and_keeps_stdout():
    result = run("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok', __name__)")
    assert (result.passed, result.status, result.returncode) == (True, "passed", 0)
    assert result.stdout == "ok __sandbox__\n"


def test_failing_assert_fails_with_traceback():
    result = run("assert 1 + 1 == 3, 'arithmetic'")
    assert (result.passed, result.status) == (False, "failed")
    assert "AssertionError: arithmetic" in result.stderr


def test_syntax_error_is_error():
    result = run("def f(:\n    pass")
    assert result.status == "error"
    assert "SyntaxError" in result.stderr


@pytest.mark.parametrize(
    "exit_call", ["import sys; sys.exit(0)", "exit()", "quit(0)", "import os; os._exit(0)"]
)
def test_leaving_before_the_tests_is_not_a_pass(exit_call):
    # A completion that exits early would otherwise skip the asserts appended after it.
    result = run(f"{exit_call}\nassert False, 'the tests'")
    assert not result.passed
    assert result.status in ("failed", "error")


def test_private_exit_bypass_is_not_a_pass():
    result = run("import posix\nposix._exit(0)\nassert False")
    assert result.returncode == 0 and result.status == "failed"


def test_stdout_tail_is_bounded_and_hash_seed_fixed():
    source = "print('x' * 100_000)\nprint(hash('unisd'), list({'a', 'b', 'c', 'd'}))"
    first, second = run(source), run(source)
    assert first.passed and len(first.stdout) <= 2048
    assert first.stdout == second.stdout  # PYTHONHASHSEED fixed: same program, same output


def test_working_directory_is_fresh_writable_and_removed():
    result = run("import os\nopen('here.txt', 'w').write('x')\nprint(os.getcwd())")
    assert result.passed, result.stderr
    workdir = Path(result.stdout.strip())
    assert workdir.name.startswith("unisd-sandbox-") and not workdir.exists()


@pytest.mark.skipif(not ROOT, reason="the uid switch needs root")
def test_runs_under_a_fresh_uid_as_root():
    uids = {int(run("import os; print(os.getuid())").stdout) for _ in range(2)}
    assert 0 not in uids and len(uids) == 2
    assert run("import os; print(os.getuid())", isolate_user=False).stdout.strip() == "0"


# --- resource abuse ----------------------------------------------------------------------------------


@both
def test_infinite_loop_times_out(isolate_user):
    start = time.monotonic()
    result = run("while True:\n    pass", timeout=2, isolate_user=isolate_user)
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - start < 2 + SLACK


def test_sleeping_program_times_out_on_wall_clock():
    result = run("import time\ntime.sleep(60)", timeout=1.5)
    assert result.status == "timeout"


@both
def test_20_gb_allocation_is_refused(isolate_user):
    result = run("x = bytearray(20 * 2**30)\nprint('allocated')", isolate_user=isolate_user)
    assert result.status == "error" and "allocated" not in result.stdout
    assert "MemoryError" in result.stderr


@both
def test_huge_file_is_cut_at_the_size_limit(isolate_user):
    source = """
        chunk = b'0' * 2**20
        with open('big.bin', 'wb') as f:
            for _ in range(20 * 1024):   # 20 GB if nothing stopped it
                f.write(chunk)
    """
    result = run(source, timeout=10, isolate_user=isolate_user)
    assert result.status == "error" and "File too large" in result.stderr


@both
@pytest.mark.parametrize(
    "source",
    [
        "import os\nwhile True:\n    os.fork()",
        "import multiprocessing\nwhile True:\n    multiprocessing.Process(target=print).start()",
        "import multiprocessing as mp\nctx = mp.get_context('spawn')\n"
        "while True:\n    ctx.Process(target=print).start()",
        "import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '100'])",
        "import os\nos.system('sleep 100 &')",
    ],
    ids=["os.fork", "multiprocessing", "multiprocessing-spawn", "subprocess", "os.system"],
)
def test_fork_loops_are_stopped_by_the_guard(source, isolate_user):
    result = run(source, isolate_user=isolate_user)
    assert result.status == "error" and "disabled in the sandbox" in result.stderr


@isolated_only
def test_fork_bomb_past_the_guard_is_contained():
    # posix.fork is the real fork: only the per-uid process limit and the final kill stop this one.
    source = """
        import posix, time
        while True:
            try:
                posix.fork()
            except OSError:
                time.sleep(0.01)
    """
    result = run(source, timeout=2)
    assert not result.passed


@isolated_only
def test_grandchild_that_leaves_the_process_group_does_not_survive():
    source = """
        import posix, sys, time
        pid = posix.fork()
        if pid == 0:
            posix.setsid()          # its own session: out of reach of the process-group kill
            time.sleep(100)
            posix._exit(0)
        print(pid, flush=True)
        time.sleep(100)
    """
    result = run(source, timeout=2)
    assert result.status == "timeout"
    assert not alive(int(result.stdout.split()[0]))


def test_cpu_limit_signal_counts_as_timeout():
    # SIGXCPU is what the kernel sends when the CPU-time limit is hit before the wall-clock one.
    result = run("import signal\nsignal.raise_signal(signal.SIGXCPU)\nprint('survived')")
    assert result.status == "timeout" and "survived" not in result.stdout


def test_crash_by_signal_is_error():
    result = run("import ctypes\nctypes.string_at(0)")
    assert result.status == "error" and result.returncode < 0


@isolated_only
def test_fork_bomb_does_not_starve_programs_running_beside_it():
    # Each run has its own uid, so one program's process limit is not the others'.
    bomb = "import posix, time\nwhile True:\n    try:\n        posix.fork()\n    except OSError:\n"
    bomb += "        time.sleep(0.01)"
    ok = "import threading, time\ntime.sleep(1)\nt = threading.Thread(target=print)\nt.start()\nt.join()\n"
    results = run_programs([bomb, ok, ok, ok], timeout=3, workers=4)
    assert [r.status for r in results[1:]] == ["passed"] * 3, results[1:]
    assert not results[0].passed


# --- harm outside the working directory ----------------------------------------------------------------


@pytest.fixture()
def sentinel(tmp_path: Path) -> Path:
    path = tmp_path / "keep" / "sentinel.txt"
    path.parent.mkdir()
    path.write_text("precious")
    return path


def assert_untouched(sentinel: Path) -> None:
    assert sentinel.read_text() == "precious"


@both
@pytest.mark.parametrize(
    "attack",
    [
        "import os\nos.remove({path!r})",
        "import os\nos.unlink({path!r})",
        "import shutil\nshutil.rmtree({dir!r})",
        "import os\nos.rename({path!r}, 'stolen')",
        "open({path!r}, 'w').write('overwritten')",
        "import pathlib\npathlib.Path({path!r}).write_text('overwritten')",
        "import os\nos.truncate({path!r}, 0)",
    ],
)
def test_files_outside_are_untouched(sentinel, attack, isolate_user):
    source = attack.format(path=str(sentinel), dir=str(sentinel.parent))
    result = run(source, isolate_user=isolate_user)
    assert not result.passed
    assert_untouched(sentinel)


@isolated_only
@pytest.mark.parametrize(
    "attack",
    [
        "import posix\nposix.unlink({path!r})",
        "import _io\n_io.open({path!r}, 'w').write('overwritten')",
        "import ctypes\nassert ctypes.CDLL(None).unlink({path!r}.encode()) == 0",
    ],
    ids=["posix.unlink", "_io.open", "ctypes-unlink"],
)
def test_files_outside_are_untouched_past_the_guard(sentinel, attack):
    result = run(attack.format(path=str(sentinel)))
    assert not result.passed
    assert_untouched(sentinel)


@isolated_only
def test_files_left_in_tmp_are_removed():
    result = run(
        "import _io, os\n_io.open('/tmp/unisd-sandbox-leftover-test', 'w').write('x')\nprint('done')"
    )
    assert result.passed, result.stderr
    assert not Path("/tmp/unisd-sandbox-leftover-test").exists()


@both
def test_killing_the_parent_fails_and_the_parent_survives(isolate_user):
    result = run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", isolate_user=isolate_user)
    assert result.status == "error"  # still running here: this test process survived


@isolated_only
@pytest.mark.parametrize("target", ["posix.getppid()", "-1"], ids=["parent", "everyone"])
def test_killing_the_parent_past_the_guard(target):
    result = run(f"import posix, signal\nposix.kill({target}, signal.SIGKILL)\nprint('sent')")
    # kill(-1) may "succeed" (it reaches only the program's own uid): either way nothing outside is hit.
    assert result.status in ("failed", "passed", "error")
    assert run("print('still here')").passed


# --- parallel ------------------------------------------------------------------------------------------


def _intervals(results) -> list[tuple[float, float]]:
    return [tuple(float(x) for x in r.stdout.split()) for r in results]


def test_run_programs_keeps_order_and_runs_in_parallel():
    """Each program prints when it started and ended its 1 s sleep: with workers, the sleeps overlap
    (run one after another, no two would); the results come back in input order."""
    sources = [
        f"import time\nprint(time.time())\ntime.sleep(1.0)\nprint(time.time())\nassert {i} % 4 != 3"
        for i in range(8)
    ]
    parallel = run_programs(sources, workers=8)
    expected = ["failed" if i % 4 == 3 else "passed" for i in range(8)]
    assert [r.status for r in parallel] == expected
    spans = _intervals(parallel)
    pairs = [(i, j) for i in range(8) for j in range(i + 1, 8)]
    overlapping = [(i, j) for i, j in pairs if spans[i][0] < spans[j][1] and spans[j][0] < spans[i][1]]
    assert len(overlapping) >= 4, spans
    serial = _intervals([run_program(s) for s in sources[:2]])  # the detector: serial runs never overlap
    assert serial[0][1] <= serial[1][0]


def test_run_programs_mixed_hostile_batch():
    sources = ["assert True", "while True: pass", "x = bytearray(20 * 2**30)", "assert False", "def f(:"]
    results = run_programs(sources, timeout=2, workers=5)
    assert [r.status for r in results] == ["passed", "timeout", "error", "failed", "error"]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="timeout and memory_mb must be positive, got 0 and 1024"):
        run_program("pass", timeout=0)
