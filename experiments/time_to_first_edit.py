"""Time a command from its start to the first appearance of a marker in its output (benchmark, not a test).

    python experiments/time_to_first_edit.py lnjax run --model smollm2 --dataset facts --editor ultraedit \\
        --turns 1 --edits-per-turn 100 --eval-every 0 --no-generation

prints the command's output as it comes, then the seconds until ``--marker`` (default ``1/1 [``, the edit
progress bar reaching its first turn of a one-turn run) first appeared and the whole command's seconds.
"""

import os
import subprocess
import sys
import time


def main() -> int:
    argv = sys.argv[1:]
    marker = b"1/1 ["
    if argv[:1] == ["--marker"]:
        marker, argv = argv[1].encode(), argv[2:]
    t0 = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail, first = b"", None
    while True:
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        tail = (tail + chunk)[-4096:]  # the marker may straddle two reads
        if first is None and marker in tail:
            first = time.time() - t0
    proc.wait()
    print(f"\nseconds to {marker.decode()!r}: {first if first is None else round(first, 1)}; "
          f"whole command: {time.time() - t0:.1f}; exit status {proc.returncode}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
