"""Every random state a fit draws from, captured and restored exactly (for checkpoints).

Torch's CPU generator and every CUDA device's (when CUDA is in use), Python's ``random`` (including its cached
Gaussian) and NumPy's global generator (including its cached Gaussian: after one ``np.random.normal()``, NumPy holds
the second value of the pair it drew, and a restore that drops it changes the next draw). Everything is stored as
tensors and plain numbers, so checkpoints holding it load with ``weights_only=True``. Loader workers draw nothing
that matters: the library's datasets seed every sample's augmentation from (seed, epoch, index).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture() -> dict[str, Any]:
    """The current random states."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(python_state, dtype=torch.int64),
        "python_version": int(version),
        "python_gauss": python_gauss,
        "numpy_kind": str(kind),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": int(position),
        "numpy_has_gauss": int(has_gauss),
        "numpy_gauss": float(cached_gauss),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore(states: dict[str, Any]) -> None:
    """Set the random states to ``states`` (from :func:`capture`)."""
    torch.set_rng_state(states["torch"])
    random.setstate(
        (int(states.get("python_version", 3)), tuple(int(v) for v in states["python"].tolist()), states["python_gauss"])
    )
    np.random.set_state(
        (
            states.get("numpy_kind", "MT19937"),
            states["numpy"].numpy().astype(np.uint32),
            int(states["numpy_pos"]),
            int(states.get("numpy_has_gauss", 0)),
            float(states.get("numpy_gauss", 0.0)),
        )
    )
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(cuda)[: torch.cuda.device_count()])
