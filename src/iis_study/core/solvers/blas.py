"""scipy's BLAS and LAPACK called from numba kernels without the GIL: a routine's address (:func:`routine`, as
``scipy.linalg.cython_blas``/``cython_lapack`` export it) is passed to the kernel and called by an LLVM intrinsic
(:func:`call_void`), so the kernel is cached on disk like any other (an address compiled in as a constant cannot
be). scipy's Python wrappers hold the GIL for the whole call, so two worker threads would take turns.

numba's on-disk cache keys a kernel on its own file only: after editing this module, clear the callers' caches
(``find src -name '*.nbi' -delete``) or touch ``kernels.py`` and ``path_newton.py``."""

from __future__ import annotations

from functools import cache

import numba
import numpy as np
from llvmlite import ir as llvm_ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def call_void(typingctx, address, pointers):  # pragma: no cover - compiled
    """Call the C function at ``address`` (an integer) as ``void f(void *, ...)`` with ``pointers`` (a tuple of
    integer addresses): the Fortran-convention BLAS and LAPACK routines scipy exports. The address is an argument,
    not a constant compiled in, so a kernel calling it can be cached on disk."""
    if not isinstance(address, types.Integer) or not isinstance(pointers, types.UniTuple) \
            or not isinstance(pointers.dtype, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        voidptr = llvm_ir.IntType(8).as_pointer()
        n = signature.args[1].count
        fn = builder.inttoptr(args[0], llvm_ir.FunctionType(llvm_ir.VoidType(), [voidptr] * n).as_pointer())
        builder.call(fn, [builder.inttoptr(builder.extract_value(args[1], i), voidptr) for i in range(n)])
        return context.get_dummy_value()

    return types.void(address, pointers), codegen


def c_float32(where: str, **arrays: np.ndarray) -> None:
    """Refuse, naming ``where`` and the argument, any of ``arrays`` the float32 kernels would misread: each must
    be a C-ordered float32 array."""
    for name, a in arrays.items():
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            raise ValueError(f"{where}: {name} must be a C-ordered float32 array, got {a.dtype}, strides {a.strides}")


@cache
def routine(name: str) -> int:
    """The address of scipy's BLAS or LAPACK routine ``name`` in this process."""
    from numba.extending import get_cython_function_address

    blas = name in ("ssyrk", "dgemm")
    return get_cython_function_address(f"scipy.linalg.cython_{'blas' if blas else 'lapack'}", name)


@numba.njit(nogil=True, cache=True)
def syrk(ssyrk, uplo, trans, dims, scal, a, c):  # pragma: no cover - compiled
    """``ssyrk`` on arrays the caller holds (a kernel's own array whose last use is ``.ctypes.data`` would be
    freed before the call reads it: numba releases a variable after its last use). ``dims``: n, k, lda, ldc;
    ``scal``: alpha, beta."""
    call_void(ssyrk, (uplo.ctypes.data, trans.ctypes.data, dims[0:].ctypes.data, dims[1:].ctypes.data,
                      scal[0:].ctypes.data, a.ctypes.data, dims[2:].ctypes.data, scal[1:].ctypes.data,
                      c.ctypes.data, dims[3:].ctypes.data))


@numba.njit(nogil=True, cache=True)
def posv(dposv, uplo, ints, a, b):  # pragma: no cover - compiled
    """LAPACK ``dposv`` on arrays the caller holds (see :func:`syrk`); ``ints``: n, nrhs, lda, ldb, info."""
    call_void(dposv, (uplo.ctypes.data, ints[0:].ctypes.data, ints[1:].ctypes.data, a.ctypes.data,
                      ints[2:].ctypes.data, b.ctypes.data, ints[3:].ctypes.data, ints[4:].ctypes.data))


@numba.njit(nogil=True, cache=True)
def gemm(dgemm, trans, dims, scal, a, b, c):  # pragma: no cover - compiled
    """``c = a @ b`` by ``dgemm`` for C-ordered float64 matrices the caller holds, ``a`` (m, k), ``b`` (k, n),
    ``c`` (m, n): to Fortran they are ``aᵀ``, ``bᵀ``, ``cᵀ``, and ``cᵀ = bᵀ aᵀ``. ``trans``: 'N'; ``dims``
    (int32, 6) and ``scal`` (float64, 2) are work arrays (numba's ``np.dot`` compiles for seconds)."""
    dims[0], dims[1], dims[2] = b.shape[1], a.shape[0], a.shape[1]
    dims[3], dims[4], dims[5] = max(1, b.shape[1]), max(1, a.shape[1]), max(1, b.shape[1])  # BLAS wants >= 1
    scal[0], scal[1] = 1.0, 0.0
    call_void(dgemm, (trans.ctypes.data, trans.ctypes.data, dims[0:].ctypes.data, dims[1:].ctypes.data,
                      dims[2:].ctypes.data, scal[0:].ctypes.data, b.ctypes.data, dims[3:].ctypes.data,
                      a.ctypes.data, dims[4:].ctypes.data, scal[1:].ctypes.data, c.ctypes.data,
                      dims[5:].ctypes.data))
