"""Make holoscan importable on a machine without a CUDA toolkit.

holoscan's core library links against ``libcudart.so.13`` even when it only runs on the CPU. The
``nvidia-cuda-runtime`` wheel ships that library but not on the loader's search path; putting its
folder on ``LD_LIBRARY_PATH`` works but only for processes started afterwards. Loading it by full
path, globally, before holoscan is imported has the same effect in this process: the dynamic loader
then resolves holoscan's dependency to the library already loaded under that name.
"""

from __future__ import annotations

import ctypes
import site
import sys
from pathlib import Path

LIBRARY = "libcudart.so.13"


def wheel_library() -> Path | None:
    """``libcudart.so.13`` from the ``nvidia-cuda-runtime`` wheel of this environment, if installed."""
    for folder in [*site.getsitepackages(), *sys.path]:
        candidate = Path(folder) / "nvidia" / "cu13" / "lib" / LIBRARY
        if candidate.is_file():
            return candidate
    return None


def load_cuda_runtime() -> None:
    """Load the CUDA runtime that holoscan needs: the system's if the loader finds one, else the wheel's."""
    try:
        ctypes.CDLL(LIBRARY, mode=ctypes.RTLD_GLOBAL)
        return
    except OSError:
        pass
    library = wheel_library()
    if library is None:
        raise ImportError(
            f"{LIBRARY} not found: install the app's requirements (nvidia-cuda-runtime) or a CUDA 13 runtime."
        )
    ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
