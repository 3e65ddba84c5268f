"""lmforge: a small, reproducible language-model training pipeline.

Importing lmforge sets one thing before torch can load: OpenMP's wait policy. Torch's CPU kernels
(ATen, MKL, oneDNN) share one OpenMP thread pool (GNU libgomp in the Linux wheels, LLVM libomp on
macOS), whose threads by default *spin* at every barrier. On a machine where another process holds
a core, a spinning thread keeps its turn on the CPU while the sibling it waits for waits for that
core: the baby's step on 2 threads beside a one-core CPU hog took 0.97 s instead of 0.06 s.
``OMP_WAIT_POLICY=PASSIVE`` makes waiting threads sleep, and the scheduler then hands the core back
to a woken thread at once. The runtime reads the variable once, when it loads (``import torch``),
so it is set here, and only where neither the user nor an earlier ``import torch`` decided it
(``WAIT_POLICY`` is the policy torch's threads have: ``lmforge info`` prints it).
"""

import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# As torch's OpenMP runtime read it, assuming nothing changed the variable between its load and here.
WAIT_POLICY = _os.environ.get("OMP_WAIT_POLICY", "active").lower()
