"""map() over worker processes that survives a worker dying mid-job.

The Triton/LLVM backend reports some unsupported code by abort() ("LLVM ERROR: Cannot
select ..."), which kills the process: with concurrent.futures one such job breaks the
whole pool. Here the parent hands each worker one job at a time over its own pipe, so
it always knows which job a dead worker held; that job's result is {"error": ...}
with the tail of the worker's stderr, and a fresh worker takes the remaining jobs.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import sys
import tempfile
from typing import Any, Callable, Iterator


def _worker(function, paths, connection, log_path):
    # The worker's stderr goes to its own file, so a crash message can be reported.
    os.dup2(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), 2)
    sys.path[:0] = paths
    while (job := connection.recv()) is not None:
        connection.send(function(job))


def imap(function: Callable[[Any], Any], jobs: list, workers: int) -> Iterator[tuple[int, Any]]:
    """Yields (job index, function(job) or {"error": ...}) in completion order.
    `function` must be importable by name (the workers are spawned)."""
    context = multiprocessing.get_context("spawn")
    pending = list(enumerate(jobs))[::-1]
    logdir = tempfile.mkdtemp(prefix="crash_tolerant_pool.")
    busy: dict[Any, tuple[Any, str, int]] = {}  # connection -> (process, log, job index)

    def hand_out(connection, process, log):
        if pending:
            index, job = pending.pop()
            connection.send(job)
            busy[connection] = (process, log, index)
        else:
            connection.send(None)
            process.join(timeout=30)

    def start():
        log = os.path.join(logdir, f"worker{len(os.listdir(logdir))}.log")
        open(log, "w").close()
        ours, theirs = context.Pipe()
        process = context.Process(target=_worker, args=(function, list(sys.path), theirs, log), daemon=True)
        process.start()
        theirs.close()
        hand_out(ours, process, log)

    for _ in range(max(1, min(workers, len(jobs)))):
        start()
    while busy:
        for connection in multiprocessing.connection.wait(list(busy)):
            process, log, index = busy.pop(connection)
            try:
                result = connection.recv()
            except EOFError:
                process.join(timeout=30)
                with open(log, errors="replace") as text:
                    tail = text.read()[-1500:].strip()
                yield index, {"error": f"compiler process died (exit {process.exitcode}): {tail}"}
                if pending:
                    start()
                continue
            yield index, result
            hand_out(connection, process, log)
