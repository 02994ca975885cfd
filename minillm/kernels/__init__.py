"""Optional Triton kernels. Nothing here imports triton at import time: `import minillm` must work
on machines without it. Ask `triton_status()` first, then `load_triton_attention()`."""
import importlib
import importlib.util
import os


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET=1: Triton runs kernels in its CPU interpreter (tests, no GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_status() -> tuple[bool, str]:
    """(usable, reason): whether the Triton attention kernel can be imported, and if not, why."""
    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a blocked or half-removed install
        found = False
    if not found:
        return False, "triton not installed"
    try:
        load_triton_attention()
    except Exception as e:  # a broken triton install must not take the fallbacks down with it
        return False, f"triton import failed: {type(e).__name__}: {e}"
    return True, "triton available"


def load_triton_attention():
    """The `minillm.kernels.triton_attention` module (imports triton; ImportError without it).

    Triton decides at kernel-definition time whether kernels are compiled or interpreted, so the
    module's mode is fixed by TRITON_INTERPRET as it was at its first import (see INTERPRETED there).
    """
    return importlib.import_module("minillm.kernels.triton_attention")
