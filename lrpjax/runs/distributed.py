"""Several JAX processes in one dataset run: where this process stands among them, and
the meeting points at which they wait for each other and learn of each other's failures.

With `jax.distributed` initialised, every process of a run goes through the same named
phases in the same order (`ProcessGroup.phase`); a process that fails publishes its error
in the distributed runtime's key-value store, and every process then raises
`ProcessFailedError` with that message, naming the process. With one process, phases do
nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Iterator

import jax

__all__ = ["ProcessFailedError", "ProcessGroup", "describe"]

_CALLS = itertools.count()


class ProcessFailedError(RuntimeError):
    """A process of a multi-process run failed (or did not come): every process raises this,
    with the failing process's message."""


def _client():
    """The distributed runtime's key-value client (a JAX internal, tested with jax 0.10)."""
    try:
        from jax._src import distributed

        client = distributed.global_state.client
    except (ImportError, AttributeError):
        client = None
    needed = ("key_value_set", "key_value_dir_get")
    if client is None or not all(hasattr(client, m) for m in needed):
        raise ProcessFailedError(
            f"several JAX processes need the distributed runtime's key-value store, which "
            f"this jax ({jax.__version__}) does not expose as lrpjax expects; lrpjax is "
            "tested with jax 0.10: install it, or run one process"
        )
    return client


def describe(error: BaseException) -> str:
    """One line for an exception, as ``lrpjax`` prints it."""
    if isinstance(error, OSError) and error.strerror:
        text = f"{error.strerror}: {error.filename or ''}".rstrip(": ")
    elif str(error) and (
        isinstance(error, ValueError | RuntimeError) or type(error).__module__.startswith("lrpjax")
    ):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return text


class ProcessGroup:
    """This process's place among the JAX processes, and their meeting points.

    Every process goes through the same named phases in the same order. A phase ends with
    each process publishing "done" (or, if it failed, its error) in the distributed
    runtime's key-value store and waiting until all have published done; as soon as any
    process has published an error, every process raises `ProcessFailedError` with it (the
    failing process too), so one failure ends the run everywhere with one message naming
    the process. With one process, phases do nothing.
    """

    #: Seconds to wait for the other processes at the end of a phase (env
    #: ``LRPJAX_PHASE_TIMEOUT_S``), and at the end of the computation (their whole share;
    #: env ``LRPJAX_COMPUTE_TIMEOUT_S``).
    PHASE_TIMEOUT_S = float(os.environ.get("LRPJAX_PHASE_TIMEOUT_S", 3600))
    COMPUTE_TIMEOUT_S = float(os.environ.get("LRPJAX_COMPUTE_TIMEOUT_S", 48 * 3600))

    def __init__(self, scope: str = "explain") -> None:
        self.index, self.count = jax.process_index(), jax.process_count()
        # every process creates its groups in the same order: the same prefix everywhere
        self.prefix = f"lrpjax/{next(_CALLS)}-{scope}"
        self.client = _client() if self.count > 1 else None

    def _failure(self) -> ProcessFailedError | None:
        errors = []
        for key, value in self.client.key_value_dir_get(f"{self.prefix}/error/"):
            errors.append((int(key.rsplit("/", 1)[-1]), value))
        if not errors:
            return None
        process, message = min(errors)
        return ProcessFailedError(f"process {process} of {self.count}: {message}")

    def check(self) -> None:
        """Raise `ProcessFailedError` if another process has failed (cheap: one lookup)."""
        if self.client is not None and (failure := self._failure()) is not None:
            raise failure

    def sync(self, phase: str, timeout: float | None = None) -> None:
        """Publish that this process finished `phase` and wait for all the others.

        Raises:
          ProcessFailedError: a process published an error, or not all arrived within `timeout`.
        """
        if self.client is None:
            return
        timeout = self.PHASE_TIMEOUT_S if timeout is None else timeout
        self.client.key_value_set(f"{self.prefix}/{phase}/{self.index}", "done")
        deadline, delay = time.monotonic() + timeout, 0.02
        while True:
            if (failure := self._failure()) is not None:
                raise failure
            arrived = {
                int(key.rsplit("/", 1)[-1])
                for key, _ in self.client.key_value_dir_get(f"{self.prefix}/{phase}/")
            }
            if len(arrived) >= self.count:
                return
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.count)) - arrived)
                raise ProcessFailedError(
                    f"process{'es' if len(missing) > 1 else ''} "
                    f"{', '.join(map(str, missing))} of {self.count} did not finish "
                    f"{phase!r} within {timeout:.0f} s; rerun the same command on all "
                    "processes to resume"
                )
            time.sleep(delay)
            delay = min(2 * delay, 0.5)

    @contextlib.contextmanager
    def phase(self, name: str, timeout: float | None = None) -> Iterator[None]:
        """Run the body, then `sync`. If the body raises, publish the error first: then
        every process raises `ProcessFailedError` naming this one (KeyboardInterrupt stays)."""
        try:
            yield
        except ProcessFailedError:
            raise
        except BaseException as e:
            if self.client is None:
                raise
            message = describe(e) if not isinstance(e, KeyboardInterrupt) else "interrupted"
            with contextlib.suppress(Exception):
                self.client.key_value_set(f"{self.prefix}/error/{self.index}", message)
            if isinstance(e, KeyboardInterrupt | SystemExit):
                raise
            raise ProcessFailedError(f"process {self.index} of {self.count}: {message}") from e
        self.sync(name, timeout)
