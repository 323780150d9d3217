"""ragcache: retrieval-augmented generation that never recomputes what it has already seen.

Importing the package first puts an optimized BLAS under MLX on Linux (see `ragcache.blas`).
"""

from ragcache.blas import ensure_fast_blas

ensure_fast_blas()

__version__ = "0.1.0"
