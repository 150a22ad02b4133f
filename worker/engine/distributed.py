"""One job on several local devices: spawn a process per rank, relay rank 0's reports, fail as a whole.

`run_data_parallel` is called where a single-device run would call `Trainer(...).run()`, with the
same callbacks. It spawns `world_size` processes (torch.multiprocessing's spawn context: forking a
process that runs threads and a CUDA context is unsafe), each a rank of one torch.distributed job
(NCCL on GPUs, gloo on CPU) that meets through a TCP store this process holds on a free port. Every
rank trains (worker/engine/parallel.py: DataParallel); rank 0 alone reports, through a pipe that
this process serves by calling the real callbacks, so the caller's callbacks (database writes,
lease checks, stop flags) stay in the caller's process and see the same calls, in the same order,
as from a single-device run.

Failure is whole-job: when any rank exits abnormally (killed, crashed, a collective timed out),
every other rank is terminated and `RankFailed` is raised; nothing is left half running. A hung
rank is bounded by the collectives' timeout: the others' next collective fails, they exit, and
the same rule applies.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .config import JobSpec
from .corpus import CorpusFile
from .parallel import DataParallel
from .trainer import Callbacks, Trainer, TrainResult

log = logging.getLogger(__name__)

STORE_HOST = "127.0.0.1"
# Seconds the ranks have to leave after rank 0 has its result, and terminated ranks to die.
EXIT_GRACE_S = 30.0
RANK_PROCESS_PREFIX = "stabletrain-rank-"
# Seconds the launcher waits, after the first sign of failure, for the other ranks' reports: a killed
# rank makes its peers' collectives fail at once, and the failure should name the killed one.
SETTLE_S = 3.0


class RankFailed(RuntimeError):
    """A rank ended abnormally; the whole run was stopped."""


class RelayCallbacks(Callbacks):
    """Rank 0's callbacks: each call goes to the launching process, which answers with the result."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def _call(self, name: str, *args: Any) -> Any:
        self.conn.send(("call", name, args))
        return self.conn.recv()

    def on_metrics(self, rows: list[dict[str, Any]]) -> None:
        self._call("on_metrics", rows)

    def on_layer_stats(self, step: int, rows: list[dict[str, Any]]) -> None:
        self._call("on_layer_stats", step, rows)

    def on_activation_stats(self, step: int, rows: list[dict[str, Any]]) -> None:
        self._call("on_activation_stats", step, rows)

    def on_event(self, event: dict[str, Any]) -> None:
        self._call("on_event", event)

    def on_checkpoint(self, info: dict[str, Any]) -> None:
        self._call("on_checkpoint", info)

    def on_checkpoint_removed(self, info: dict[str, Any]) -> None:
        self._call("on_checkpoint_removed", info)  # answered after the record is gone: then the file goes

    def on_diagnosis(self, findings: list[dict[str, Any]], summary: str) -> None:
        self._call("on_diagnosis", findings, summary)

    def may_write_checkpoints(self) -> bool:
        return bool(self._call("may_write_checkpoints"))

    def should_stop(self) -> bool:
        return bool(self._call("should_stop"))

    def should_pause(self) -> bool:
        return bool(self._call("should_pause"))


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def device_count(device_type: str) -> int | None:
    """Devices a data-parallel job may use here: the visible GPUs; None (no limit) for CPU processes."""
    return torch.cuda.device_count() if device_type == "cuda" else None


def run_data_parallel(
    spec: JobSpec,
    text: str | CorpusFile,
    out_dir: Path,
    callbacks: Callbacks,
    *,
    device_type: str = "cpu",
    resume_from: Path | None = None,
    world_size: int | None = None,
    collective_timeout_s: float = 600.0,
) -> TrainResult:
    """Train `spec` on `world_size` (default resources.devices) ranks; rank 0's result.

    Raises what rank 0's Trainer raised (DataError, ValueError for a spec the device cannot run, a
    callback's own exception) or RankFailed; in every case no rank is left running."""
    world_size = world_size or spec.resources.devices
    available = device_count(device_type)
    if available is not None and world_size > available:
        raise ValueError(f"resources.devices: the job asks for {world_size} devices; this worker has {available}")
    store = dist.TCPStore(STORE_HOST, 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=collective_timeout_s))
    ctx = mp.get_context("spawn")
    ranks: list[tuple[Any, Connection]] = []
    try:
        for rank in range(world_size):
            ours, theirs = ctx.Pipe()
            kwargs = {"spec": spec, "text": text, "out_dir": out_dir, "resume_from": resume_from}
            proc = ctx.Process(target=_rank_main, name=f"{RANK_PROCESS_PREFIX}{rank}", daemon=True,
                               args=(rank, world_size, store.port, device_type, collective_timeout_s, kwargs, theirs))
            proc.start()
            theirs.close()
            ranks.append((proc, ours))
        return _serve(ranks, callbacks)
    finally:
        _stop_all([proc for proc, _ in ranks])
        for _, conn in ranks:
            conn.close()
        del store


def _serve(ranks: list[tuple[Any, Connection]], callbacks: Callbacks) -> TrainResult:
    """Answer rank 0's callback calls until it hands over its result and every rank has exited."""
    run = _Run(ranks)
    while run.result is None:
        run.poll(callbacks)
        if run.result is None and run.failed():
            run.settle(callbacks)
            raise run.failure()
    # Training is over and rank 0's checkpoint is written: a rank slow to leave (or failing on its way
    # out) changes nothing; the caller's cleanup terminates whatever is left after the grace.
    for proc in run.procs:
        proc.join(EXIT_GRACE_S)
    return run.result


class _Run:
    """What the launcher knows of its ranks: their pipes, exits, reported errors and rank 0's result."""

    def __init__(self, ranks: list[tuple[Any, Connection]]) -> None:
        self.procs = [proc for proc, _ in ranks]
        self.conns = {conn: rank for rank, (_, conn) in enumerate(ranks)}
        self.errors: dict[int, tuple[BaseException | None, str]] = {}
        self.result: TrainResult | None = None
        self.exit_order: list[int] = []  # ranks in the order their exits were seen

    def alive(self) -> list[Any]:
        return [p for p in self.procs if p.exitcode is None]

    def _note_exits(self) -> None:
        for rank, proc in enumerate(self.procs):
            if proc.exitcode is not None and rank not in self.exit_order:
                self.exit_order.append(rank)

    def poll(self, callbacks: Callbacks, timeout: float | None = None) -> None:
        """Wait for a message or an exit, and handle what arrived."""
        ready = wait([*self.conns, *(p.sentinel for p in self.alive())], timeout)
        self._note_exits()
        for conn in [c for c in ready if c in self.conns]:
            rank = self.conns[conn]
            try:
                message = conn.recv()
            except EOFError:  # the rank has gone; its exit code tells how
                del self.conns[conn]
                continue
            if message[0] == "call" and rank == 0:
                _, name, args = message
                conn.send(getattr(callbacks, name)(*args))  # a callback's exception stops every rank
            elif message[0] == "result":
                self.result = message[1]
            elif message[0] == "error":
                self.errors[rank] = (message[1], message[2])

    def failed(self) -> bool:
        # rank 0's pipe is read to its end (the result comes before the end) before this counts
        lost_primary = self.procs[0].exitcode == 0 and self.result is None and 0 not in self.conns.values()
        return bool(self.errors) or lost_primary or any(p.exitcode not in (None, 0) for p in self.procs)

    def settle(self, callbacks: Callbacks) -> None:
        """Let the other ranks' reactions to the first failure arrive, so the failure names its cause."""
        deadline = time.monotonic() + SETTLE_S
        while self.alive() and time.monotonic() < deadline:
            self.poll(callbacks, timeout=max(0.0, deadline - time.monotonic()))

    def failure(self) -> BaseException:
        """The cause: a killed rank (a kill before a peer's abort); else rank 0's own exception (a
        DataError, a spec the device cannot run: what a single-device run would raise); else the first
        rank whose error is its own rather than a collective failing because a peer went away."""
        world = len(self.procs)
        killed = self._killed_by_cause_first()
        if killed:
            return RankFailed(_failure_message(killed[0], world, self.procs[killed[0]].exitcode, None))
        own = self.errors.get(0)
        if own is not None and own[0] is not None and not _peer_failure(own[1]):
            return own[0]
        reports = sorted(self.errors.items(), key=lambda item: (_peer_failure(item[1][1]), item[0]))
        if reports:
            rank, (_, text) = reports[0]
            return RankFailed(_failure_message(rank, world, self.procs[rank].exitcode, text))
        for rank, proc in enumerate(self.procs):
            if proc.exitcode not in (None, 0):
                return RankFailed(_failure_message(rank, world, proc.exitcode, None))
        return RankFailed(_failure_message(0, world, 0, "exited without a result"))

    def _killed_by_cause_first(self) -> list[int]:
        """Ranks killed by a signal, the likeliest cause first. A rank whose peer is killed often dies of
        SIGABRT (the collective library's thread throws, std::terminate aborts), so an abort ranks after
        any other signal; ties go to the exit seen first."""
        self._note_exits()
        killed = [rank for rank in self.exit_order if (self.procs[rank].exitcode or 0) < 0]
        return sorted(killed, key=lambda rank: self.procs[rank].exitcode == -signal.SIGABRT)  # stable: exit order


def _peer_failure(text: str) -> bool:
    """An error a rank sees because another rank failed: a collective or the store lost its peer."""
    return text.startswith(("DistError", "DistBackendError", "DistNetworkError", "DistStoreError")) or any(
        marker in text for marker in ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer"))


def _failure_message(rank: int, world_size: int, exitcode: int | None, error: str | None) -> str:
    if exitcode is not None and exitcode < 0:
        how = f"was killed by {signal.Signals(-exitcode).name}"
    else:
        how = "failed" if exitcode is None else f"exited with code {exitcode}"
    detail = f": {error}" if error else ""
    return (f"rank {rank} of {world_size} {how}{detail}; every rank was stopped (a data-parallel job runs "
            "whole or not at all)")


def _stop_all(procs: list[Any]) -> None:
    """Terminate every rank still running, then kill what ignores it."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(EXIT_GRACE_S)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _rank_main(rank: int, world_size: int, port: int, device_type: str, timeout_s: float,
               kwargs: dict[str, Any], conn: Connection) -> None:
    """One rank: join the process group, train, and hand rank 0's result to the launcher."""
    # Ctrl-C reaches the whole process group; the launcher decides when ranks stop (it asks rank 0 to
    # checkpoint and stop through should_stop), so a rank must not die of it on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)})
    try:
        device = _rank_device(device_type, rank, world_size)
        store = dist.TCPStore(STORE_HOST, port, is_master=False, timeout=timedelta(seconds=timeout_s))
        dist.init_process_group(backend_for(device_type), store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        try:
            callbacks = RelayCallbacks(conn) if rank == 0 else Callbacks()
            trainer = Trainer(callbacks=callbacks, device=str(device),
                              parallel=DataParallel(rank, world_size, device), **kwargs)
            result = trainer.run()
            if rank == 0:
                conn.send(("result", result))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, then the rank exits non-zero
        _report_error(conn, exc)
        sys.exit(1)
    conn.close()


def _rank_device(device_type: str, rank: int, world_size: int) -> torch.device:
    if device_type != "cuda":
        # N processes share the host's cores: each takes its share instead of all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        return torch.device("cpu")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # NCCL talks to the current device
    return torch.device("cuda", int(os.environ["LOCAL_RANK"]))


def _report_error(conn: Connection, exc: BaseException) -> None:
    text = f"{type(exc).__name__}: {exc}"
    log.error("rank failed: %s", "".join(traceback.format_exception(exc)))
    try:
        conn.send(("error", exc, text))
    except Exception:  # noqa: BLE001 - an exception that does not pickle still reports its words
        try:
            conn.send(("error", None, text))
        except OSError:
            pass  # the launcher has gone: the exit code is all that is left
