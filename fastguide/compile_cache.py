"""Where torch.compile keeps what it compiled for fastguide's step, so that the next process starts warm.

Inductor writes its caches (the FX-graph cache with the generated kernels, the AOT-autograd cache) under
``TORCHINDUCTOR_CACHE_DIR``, by default a folder in the system's temporary directory
(``/tmp/torchinductor_$USER``), which many systems empty at every boot. Before fastguide compiles a step it
points that variable at the user's cache folder, ``$XDG_CACHE_HOME/fastguide/torchinductor`` (else
``~/.cache/fastguide/torchinductor``), unless the user chose a folder: any value of the variable other than
torch's default is left as it is. The variable is process-wide, so other torch.compile calls of the same
process use the same folder from then on.

The AOT-autograd cache (the traced forward and backward) refuses a graph that enters autocast, as the
step does around its networks, so a warm start would trace the step's autograd again (about 6 s of a 15 s
warm start of the embedded models on 2 cores). Autocast's entry and exit are plain functions of their
constant arguments (device, dtype, enabled), which are in the graph and so in the cache key;
:func:`cacheable_autocast` marks them cacheable while the step compiles.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

ENV = "TORCHINDUCTOR_CACHE_DIR"


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fastguide/torchinductor``, else ``~/.cache/fastguide/torchinductor``."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastguide" / "torchinductor"


def _torch_default() -> str:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(default_cache_dir())


def use_user_cache() -> str:
    """Point inductor's caches at :func:`user_cache_dir` unless ``TORCHINDUCTOR_CACHE_DIR`` already names
    another folder than torch's default (the user's choice, kept); returns the folder in use. Where the user's
    cache folder cannot be made, torch's default stays."""
    current = os.environ.get(ENV)
    if current and os.path.abspath(current) != _torch_default():
        return current
    folder = user_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return current or _torch_default()
    os.environ[ENV] = str(folder)
    return str(folder)


# autocast's graph functions, keyed by torch's version (inductor's unsafe_marked_cacheable_functions)
_AUTOCAST_FUNCTIONS = ("torch.amp.autocast_mode._enter_autocast", "torch.amp.autocast_mode._exit_autocast")


@contextlib.contextmanager
def cacheable_autocast():
    """While a step compiles: its autocast regions do not keep its graph out of the AOT-autograd cache."""
    marked = {**torch._inductor.config.unsafe_marked_cacheable_functions,
              **{name: torch.__version__ for name in _AUTOCAST_FUNCTIONS}}  # fmt: skip
    with torch._inductor.config.patch(unsafe_marked_cacheable_functions=marked):
        yield
