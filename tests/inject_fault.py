"""Runs a script with one fault injected, for tests/test_faults.py:

    python tests/inject_fault.py enospc N SCRIPT ARGS...   torch.save works N times, then writes half a file
                                                           and fails as a full disk does (ENOSPC)
"""
import errno
import os
import runpy
import sys

import torch

fault, count, script, *args = sys.argv[1:]
if fault != "enospc":
    raise SystemExit(f"unknown fault {fault!r}")
calls, real_save = [0], torch.save


def full_disk_save(obj, f, *a, **kw):
    calls[0] += 1
    if calls[0] <= int(count):
        return real_save(obj, f, *a, **kw)
    with open(f, "wb") as half:
        half.write(b"\0" * 4096)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))


torch.save = full_disk_save
sys.argv = [script, *args]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
