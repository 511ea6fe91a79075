#!/usr/bin/env python3
"""Do two fdatasyncs of different files at once take less time than one after the other?

The store makes a batch durable with two syncs in series: the body log's segment
(append + fdatasync), then sled's flush and the sync of its files. Overlapping the first
of one batch with the second of the one before only pays if the disk serves two syncs at
once faster than in turn. This measures exactly that, on the file system of the directory
given (default: the current one), with writes of a batch's size (30 KB, ~41 events):

    python3 benches/sync-overlap.py /var/lib/kallina-relay

Python releases the GIL around write() and fdatasync(), so the two threads do overlap.
"""

import os
import sys
import tempfile
import threading
import time

ROUNDS = 300
CHUNK = b"x" * 30_000


def append_and_sync(fd: int) -> None:
    os.write(fd, CHUNK)
    os.fdatasync(fd)


def main() -> None:
    where = sys.argv[1] if len(sys.argv) > 1 else "."
    with tempfile.TemporaryDirectory(dir=where, prefix="sync-overlap-") as tmp:
        flags = os.O_CREAT | os.O_WRONLY | os.O_APPEND
        a = os.open(os.path.join(tmp, "a"), flags)
        b = os.open(os.path.join(tmp, "b"), flags)
        start = time.perf_counter()
        for _ in range(ROUNDS):
            append_and_sync(a)
            append_and_sync(b)
        serial = (time.perf_counter() - start) / ROUNDS
        # A helper thread started once, so that no thread start is timed.
        go, done = threading.Semaphore(0), threading.Semaphore(0)

        def helper() -> None:
            for _ in range(ROUNDS):
                go.acquire()
                append_and_sync(b)
                done.release()

        other = threading.Thread(target=helper)
        other.start()
        start = time.perf_counter()
        for _ in range(ROUNDS):
            go.release()
            append_and_sync(a)
            done.acquire()
        overlapped = (time.perf_counter() - start) / ROUNDS
        other.join()
        os.close(a)
        os.close(b)
    print(
        f"two appends with fdatasync: one after the other {serial * 1e6:.0f} us, "
        f"at once {overlapped * 1e6:.0f} us ({overlapped / serial:.0%} of serial)"
    )


if __name__ == "__main__":
    main()
