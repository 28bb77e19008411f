"""Process settings the `jaxalign` command applies before JAX starts.

XLA:CPU takes each step's scratch memory (about 1.7 GB for the SFT benchmark) from one
large `malloc` that glibc serves with a fresh `mmap` and returns with `munmap`, so every
step page-faults it in again 4 KiB at a time: about half a million faults per step. With
glibc's `hugetlb` tunable those mappings are advised as transparent huge pages (2 MiB), which
cuts the faults from ~511k to ~1.9k per step (`jaxalign bench sft` reports
`page_faults_per_step`). Fewer faults did not make steps faster: interleaved runs on a 2-core
VM measured SFT, DPO and GRPO-update steps 3-75% *slower* with it (docs/benchmarks.md), so it
is opt-in: with `JAXALIGN_MALLOC_TUNING=1` the command re-executes itself once with the setting
(tunables are read by the dynamic loader at start-up). A `GLIBC_TUNABLES` the user already
set is left as it is.
"""

from __future__ import annotations

import os
import platform
import sys

MALLOC_TUNABLES = "glibc.malloc.hugetlb=1"


def malloc_tuning_wanted(environ=os.environ) -> bool:
    """True when the process should re-execute with `MALLOC_TUNABLES`: Linux with glibc,
    opted in (`JAXALIGN_MALLOC_TUNING=1`), and no `GLIBC_TUNABLES` set (by the user or by an
    earlier re-exec)."""
    return (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
            and environ.get("JAXALIGN_MALLOC_TUNING", "0") == "1" and "GLIBC_TUNABLES" not in environ)


def reexec_with_malloc_tuning() -> None:
    """Replace this process by the same command line with `GLIBC_TUNABLES=MALLOC_TUNABLES`
    (same PID, arguments and otherwise the same environment); a no-op when
    `malloc_tuning_wanted()` is False."""
    if not malloc_tuning_wanted():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES))
