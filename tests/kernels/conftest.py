"""Kernel tests run Triton's CPU interpreter when there is no GPU.

``TRITON_INTERPRET`` is read when each ``@triton.jit`` function is defined, Triton's own helpers
(``tl.zeros``, ...) included, so it must be set before anything imports Triton.  If something did
(e.g. a conftest higher up importing the kernels), it is too late to switch: the kernel tests then
skip and ``test_runs_in_interpreter_without_gpu`` fails, asking for ``TRITON_INTERPRET=1`` in the
environment or in ``tests/conftest.py``.
"""

import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
