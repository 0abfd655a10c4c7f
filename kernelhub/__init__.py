"""kernelhub: a self-hosted, secure code-execution service built on Jupyter kernels."""

from __future__ import annotations

__version__ = "0.1.0"
