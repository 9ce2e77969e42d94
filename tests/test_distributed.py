"""``lrpjax explain --distributed`` with two real processes on 127.0.0.1.

Each process gets 2 simulated CPU devices (4 in all), the coordinator listens on 127.0.0.1
only, and the processes find each other as the README says: ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` in the environment, or ``--coordinator``,
``--num-processes`` and ``--process-id``. The data is an image folder of 64 images in 8 of
CIFAR-10's classes; the result must equal a one-process run. An error on one process ends
both with exit status 2 and one ``error:`` line naming that process.

Every process writes its output to files (no pipes to fill), is killed and reaped when its
test ends, and all waits of a test share one deadline, set when the test starts.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lrpjax import data
from lrpjax.commands import explain as explain_command
from lrpjax.commands import main as cli
from lrpjax.runs import store

CLASSES = ("airplane", "bird", "cat", "deer", "dog", "frog", "ship", "truck")
PER_CLASS, BATCH = 8, 8  # 64 images, 8 chunks: 4 per process
N = PER_CLASS * len(CLASSES)
#: Seconds for one test (all its process runs together); the clock starts with the test,
#: not at collection, which under pytest-xdist can be minutes earlier.
BUDGET = float(os.environ.get("LRPJAX_DISTRIBUTED_TEST_BUDGET_S", 150))
_deadline = [0.0]


@pytest.fixture(autouse=True)
def _test_deadline():
    _deadline[0] = time.monotonic() + BUDGET
    yield


#: One process: counts the images each compiled step gets (sha1 of each real row; padding
#: rows are zeros), optionally dies (as kill -9 would) or raises at a given step, then runs
#: the CLI.
DRIVER = textwrap.dedent(
    """
    import hashlib, json, os, sys
    from lrpjax.commands import main as cli
    from lrpjax.runs import explain

    report = sys.argv[1]
    die_at = int(os.environ.get("DIE_AT_STEP", "0"))
    raise_at = int(os.environ.get("RAISE_AT_STEP", "0"))
    steps, hashes = [0], []
    real = explain.make_step

    def make_step(*args, **kwargs):
        step, state, num_devices = real(*args, **kwargs)

        def spy(state, x, target):
            if steps[0] + 1 == die_at:
                os._exit(9)
            if steps[0] + 1 == raise_at:
                raise ValueError("the step broke here")
            steps[0] += 1
            hashes.extend(hashlib.sha1(row.tobytes()).hexdigest() for row in x if row.any())
            return step(state, x, target)

        return spy, state, num_devices

    explain.make_step = make_step
    rc = cli.main(sys.argv[2:])
    with open(report, "w") as f:
        json.dump({"rc": rc, "steps": steps[0], "hashes": hashes}, f)
    sys.exit(rc)
    """
)


def remaining() -> float:
    left = _deadline[0] - time.monotonic()
    if left <= 0:
        pytest.fail(f"the test's process runs took longer than their budget of {BUDGET:.0f} s")
    return left


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def row_hash(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image, np.float32).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """64 distinct 32x32 images in test/<class>/ for 8 CIFAR-10 classes (not all ten)."""
    x, y = data.sample()
    root = tmp_path_factory.mktemp("dist-data")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        k = data.CIFAR10_CLASSES.index(name)
        base = x[y == k]
        (root / "test" / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            img = base[i % len(base)]
            pixels = np.clip(img * 255 + rng.integers(0, 2, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "test" / name / f"{i:03d}.png")
    return root


ARGS = ["explain", "--batch-size", str(BATCH), "--target", "label", "--no-progress"]


class Pair:
    """Two processes of one distributed run, their output in files."""

    def __init__(self, procs: list[subprocess.Popen], logs: list[tuple[Path, Path, Path]]):
        self.procs, self.logs = procs, logs

    def wait(self) -> list[dict]:
        for proc in self.procs:
            try:
                proc.wait(timeout=remaining())
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"the test's process runs took longer than their budget of {BUDGET:.0f} s"
                )
        results = []
        for proc, (out, err, report) in zip(self.procs, self.logs, strict=True):
            results.append(
                {"rc": proc.returncode, "stdout": out.read_text(), "stderr": err.read_text()}
                | (json.loads(report.read_text()) if report.exists() else {})
            )
        return results


@pytest.fixture
def launch(tmp_path):
    """``launch(out, ...)`` starts a two-process run; every process is killed and reaped
    when the test ends, whatever happened."""
    started: list[subprocess.Popen] = []
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    runs = iter(range(1000))

    def start(out: Path, folder: Path, *, flags=False, env=None, extra=None) -> Pair:
        port, run = free_port(), next(runs)
        procs, logs = [], []
        for i in range(2):
            environ = {
                **os.environ,
                "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",
                **{k: str(v) for k, v in ((env or {}).get(i) or {}).items()},
            }
            argv = [*ARGS, "--data-dir", str(folder), "--out", str(out), "--distributed"]
            argv += [str(a) for a in (extra or {}).get(i, [])]
            if flags:
                argv += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
                argv += ["--process-id", str(i)]
            else:
                environ |= {
                    "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                    "JAX_NUM_PROCESSES": "2",
                    "JAX_PROCESS_ID": str(i),
                }
            files = tuple(tmp_path / f"run{run}-p{i}.{kind}" for kind in ("out", "err", "json"))
            with open(files[0], "w") as stdout, open(files[1], "w") as stderr:
                proc = subprocess.Popen(
                    [sys.executable, str(script), str(files[2]), *argv],
                    env=environ, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                )  # fmt: skip
            started.append(proc)
            procs.append(proc)
            logs.append(files)
        return Pair(procs, logs)

    def start_and_wait(out: Path, folder: Path, **kwargs) -> list[dict]:
        """Run to the end; once more on a fresh port if the coordinator could not bind
        (another program took the free port in between)."""
        results = start(out, folder, **kwargs).wait()
        if any("address already in use" in r["stderr"].lower() for r in results):
            results = start(out, folder, **kwargs).wait()
        return results

    start.run = start_and_wait
    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def one_process(folder, tmp_path_factory) -> Path:
    """The same command on one process (this one), without --distributed."""
    out = tmp_path_factory.mktemp("one") / "out"
    code = cli.main([*ARGS, "--data-dir", str(folder), "--out", str(out)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def images(folder) -> np.ndarray:
    return data.load(folder, "test", progress=False)[0]


def listing(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def assert_same_result(out: Path, reference: Path) -> None:
    """Same files, same labels/predictions/targets, relevance equal relative to each image."""
    assert listing(out) == listing(reference)
    for name in ("labels", "predictions", "targets"):
        np.testing.assert_array_equal(
            np.load(out / f"{name}.npy"), np.load(reference / f"{name}.npy"), err_msg=name
        )
    np.testing.assert_allclose(
        np.load(out / "probabilities.npy"), np.load(reference / "probabilities.npy"), atol=1e-5
    )
    got, expected = np.load(out / "relevance.npy"), np.load(reference / "relevance.npy")
    assert got.shape == expected.shape == (N, 32, 32, 3)
    scale = np.abs(expected).max(axis=(1, 2, 3), keepdims=True)
    assert (scale > 0).all()
    np.testing.assert_array_less(np.abs(got - expected), np.broadcast_to(1e-4 * scale, got.shape))


def test_two_processes_explain_every_image_once_into_one_result(
    folder, one_process, images, tmp_path, launch
):
    out = tmp_path / "out"
    results = launch.run(out, folder)
    for i, r in enumerate(results):
        assert r["rc"] == 0, r["stderr"][-3000:]
        assert f"process {i} of 2: explained {N} images" in r["stdout"], r["stdout"]

    # Every image explained exactly once, process 0 the first 4 chunks, process 1 the rest.
    expected = [row_hash(im) for im in images]
    assert len(set(expected)) == N
    seen = results[0]["hashes"] + results[1]["hashes"]
    assert collections.Counter(seen) == collections.Counter(expected)
    assert results[0]["hashes"] == expected[: 4 * BATCH]
    assert results[1]["hashes"] == expected[4 * BATCH :]
    assert [r["steps"] for r in results] == [4, 4]

    # One result, laid out as a one-process run's, with the same numbers.
    assert_same_result(out, one_process)
    summary = json.loads((out / "summary.json").read_text())
    reference = json.loads((one_process / "summary.json").read_text())
    assert summary["images"] == N and summary["processes"] == 2
    assert len(summary["devices"]) == 4
    assert summary["accuracy"] == pytest.approx(reference["accuracy"])
    # Labels by class name: cat is CIFAR-10 class 3 although it is the folder's third class.
    labels = np.load(out / "labels.npy")
    assert sorted(set(labels.tolist())) == [data.CIFAR10_CLASSES.index(c) for c in CLASSES]
    assert summary["accuracy"] > 0.5


def test_killed_process_resumes_only_its_missing_chunks_with_flags(
    folder, one_process, tmp_path, launch
):
    """Process 1 dies (kill -9) after its first chunk; the rerun, started with the flags
    instead of the environment, computes only the missing chunks."""
    out = tmp_path / "out"
    pair = launch(out, folder, env={1: {"DIE_AT_STEP": 2}})
    p0, p1 = pair.procs
    p1.wait(timeout=remaining())
    assert p1.returncode == 9
    (work,) = out.glob(".partial-explain-*")
    manifest0 = work / "process-0" / "manifest.json"
    while p0.poll() is None and remaining():
        if manifest0.exists() and len(json.loads(manifest0.read_text())["done"]) == 4:
            break  # process 0 has done its share and waits for process 1
        time.sleep(0.2)
    if p0.poll() is None:
        p0.send_signal(signal.SIGKILL)  # as a scheduler ends the job when one task dies
    p0.wait(timeout=remaining())
    assert not (out / "relevance.npy").exists() and not (out / "summary.json").exists()
    done = [
        set(json.loads((work / f"process-{i}" / "manifest.json").read_text())["done"])
        for i in range(2)
    ]
    assert done[1] == {4 * BATCH}  # process 1 finished its first chunk only
    missing = [4 - len(done[0]), 4 - len(done[1])]

    results = launch.run(out, folder, flags=True)
    for r in results:
        assert r["rc"] == 0, r["stderr"][-3000:]
    assert [r["steps"] for r in results] == missing
    assert "resuming: 1 of 4 chunks" in results[1]["stdout"]
    assert_same_result(out, one_process)
    assert not list(out.glob(".partial-*")) and not (out / store.LOCK_NAME).exists()


def assert_failed_with(results: list[dict], message: str) -> None:
    """Both processes exit 2 with the same one error line, naming the failing process."""
    for r in results:
        assert r["rc"] == 2, r["stderr"][-3000:]
        lines = [line for line in r["stderr"].splitlines() if line.startswith("error:")]
        assert len(lines) == 1, r["stderr"][-3000:]
        assert lines[0].startswith(f"error: {message}"), lines[0]
        assert "Traceback" not in r["stderr"], r["stderr"][-3000:]


def test_error_on_one_process_while_computing_ends_both(folder, tmp_path, launch):
    out = tmp_path / "out"
    results = launch.run(out, folder, env={1: {"RAISE_AT_STEP": 2}})
    assert_failed_with(results, "process 1 of 2: the step broke here")
    assert not (out / "summary.json").exists() and not (out / store.LOCK_NAME).exists()


def test_error_on_one_process_while_preparing_ends_both(folder, tmp_path, launch):
    """Process 1 cannot read its data (a host without the shared folder)."""
    out = tmp_path / "out"
    results = launch.run(out, folder, extra={1: ["--data-dir", tmp_path / "not-mounted"]})
    assert_failed_with(results, "process 1 of 2: ")
    assert all("not-mounted does not exist" in r["stderr"] for r in results)
    assert not out.exists() or not any(out.iterdir())


def test_distributed_with_one_process(folder, one_process, tmp_path):
    """``--distributed`` with JAX_NUM_PROCESSES=1 (it used to crash): the plain result."""
    port = free_port()
    out = tmp_path / "out"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": "1",
        "JAX_PROCESS_ID": "0",
    }
    argv = [*ARGS, "--data-dir", str(folder), "--out", str(out), "--distributed"]
    code = f"import sys; from lrpjax.commands.main import main; sys.exit(main({argv!r}))"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True,
        timeout=remaining(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"explained {N} images" in proc.stdout
    assert_same_result(out, one_process)


def test_distributed_settings_are_checked():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_PROCESSES": "two"}
    code = (
        "import sys; from lrpjax.commands.main import main; "
        "sys.exit(main(['explain', '--distributed']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: JAX_NUM_PROCESSES must be an integer, got 'two'"


def test_distributed_flags_are_parsed(monkeypatch):
    seen = {}

    def fake_init(coordinator, num_processes, process_id):
        seen.update(coordinator=coordinator, n=num_processes, id=process_id)
        raise cli.CLIError("stop here")

    monkeypatch.setattr(explain_command, "init_distributed", fake_init)
    argv = ["explain", "--distributed", "--coordinator", "10.0.0.1:1234"]
    assert cli.main([*argv, "--num-processes", "4", "--process-id", "0"]) == 2
    assert seen == {"coordinator": "10.0.0.1:1234", "n": 4, "id": 0}
