"""LLVM intrinsics of the fused interpretation heads' kernels (see :mod:`.fused`): a float32
fused multiply-add, a bit-pattern cast, and AVX-512 compress / multiply-add / dot product
over 16 lanes.

An intrinsic is compiled into each kernel that calls it, and numba's cache (``cache=True``)
checks only the file of the cached function: after editing this file, delete the cached
kernels of :mod:`.fused_kernels` (``__pycache__/fused_kernels.*.nbi`` and ``.nbc``).
"""

from __future__ import annotations

try:  # numba is optional: without it the torch path is used
    import numba
    from llvmlite import ir as _llvm_ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None


if numba is not None:

    @intrinsic
    def fma(typingctx, x, y, z):
        """``x * y + z`` with one rounding (as torch.addcmul on CPU)."""
        if not (x == types.float32 and y == types.float32 and z == types.float32):
            return None
        sig = types.float32(types.float32, types.float32, types.float32)

        def codegen(context, builder, signature, args):
            f32 = _llvm_ir.FloatType()
            fnty = _llvm_ir.FunctionType(f32, [f32, f32, f32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.f32")
            return builder.call(fn, args)

        return sig, codegen

    @intrinsic
    def bits_to_f32(typingctx, x):
        """The float32 whose bit pattern is the int32 ``x``."""
        if x != types.int32:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _llvm_ir.FloatType())

        return types.float32(types.int32), codegen


    @intrinsic
    def compress16(typingctx, v, start, out, n):
        """Append to ``out[n:]`` the indices ``start + t`` (``t < 16``) with ``v[start + t] > 0.5``
        (one AVX-512 ``vpcompressd``); returns the new ``n``."""
        sig = types.int64(v, types.int64, out, types.int64)

        def codegen(context, builder, signature, args):
            v_ty, _, out_ty, _ = signature.args
            v_arr = context.make_array(v_ty)(context, builder, args[0])
            out_arr = context.make_array(out_ty)(context, builder, args[2])
            f32, i32, i64 = _llvm_ir.FloatType(), _llvm_ir.IntType(32), _llvm_ir.IntType(64)
            vf = _llvm_ir.VectorType(f32, 16)
            vi = _llvm_ir.VectorType(i32, 16)
            vb = _llvm_ir.VectorType(_llvm_ir.IntType(1), 16)
            vec = builder.load(builder.gep(v_arr.data, [args[1]]), typ=vf, align=4)
            mask = builder.fcmp_ordered(">", vec, _llvm_ir.Constant(vf, [0.5] * 16))
            first = builder.insert_element(
                _llvm_ir.Constant(vi, _llvm_ir.Undefined),
                builder.trunc(args[1], i32),
                _llvm_ir.Constant(i32, 0),
            )
            splat = builder.shuffle_vector(
                first, _llvm_ir.Constant(vi, _llvm_ir.Undefined), _llvm_ir.Constant(vi, [0] * 16)
            )
            iota = builder.add(splat, _llvm_ir.Constant(vi, list(range(16))))
            dst = builder.gep(out_arr.data, [args[3]])
            fnty = _llvm_ir.FunctionType(_llvm_ir.VoidType(), [vi, dst.type, vb])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.masked.compressstore.v16i32")
            builder.call(fn, [iota, dst, mask])
            i16 = _llvm_ir.IntType(16)
            pop = cgutils.get_or_insert_function(
                builder.module, _llvm_ir.FunctionType(i16, [i16]), "llvm.ctpop.i16"
            )
            cnt = builder.zext(builder.call(pop, [builder.bitcast(mask, i16)]), i64)
            return builder.add(args[3], cnt)

        return sig, codegen

    def _vec16_ptr(context, builder, aryty, ary, offset):
        """Pointer to the 16 float32 at flat element ``offset`` of a C-contiguous array."""
        arr = context.make_array(aryty)(context, builder, ary)
        v16 = _llvm_ir.VectorType(_llvm_ir.FloatType(), 16)
        return builder.bitcast(builder.gep(arr.data, [offset]), v16.as_pointer())

    @intrinsic
    def axpy16(typingctx, y, y_off, x, x_off, alpha):
        """``y[y_off:y_off+16] += alpha * x[x_off:x_off+16]`` (flat offsets, one vector FMA)."""
        sig = types.void(y, types.int64, x, types.int64, types.float32)

        def codegen(context, builder, signature, args):
            v16 = _llvm_ir.VectorType(_llvm_ir.FloatType(), 16)
            yp = _vec16_ptr(context, builder, signature.args[0], args[0], args[1])
            xp = _vec16_ptr(context, builder, signature.args[2], args[2], args[3])
            i32 = _llvm_ir.IntType(32)
            a = builder.insert_element(
                _llvm_ir.Constant(v16, _llvm_ir.Undefined), args[4], _llvm_ir.Constant(i32, 0)
            )
            splat = _llvm_ir.Constant(_llvm_ir.VectorType(i32, 16), [0] * 16)
            a = builder.shuffle_vector(a, _llvm_ir.Constant(v16, _llvm_ir.Undefined), splat)
            fn = cgutils.get_or_insert_function(
                builder.module, _llvm_ir.FunctionType(v16, [v16, v16, v16]), "llvm.fma.v16f32"
            )
            builder.store(
                builder.call(fn, [builder.load(xp, align=4), a, builder.load(yp, align=4)]), yp, align=4
            )
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def dot16(typingctx, x, x_off, y, y_off):
        """``sum(x[x_off:x_off+16] * y[y_off:y_off+16])`` (flat offsets, one vector product)."""
        sig = types.float32(x, types.int64, y, types.int64)

        def codegen(context, builder, signature, args):
            f32 = _llvm_ir.FloatType()
            v16 = _llvm_ir.VectorType(f32, 16)
            xp = _vec16_ptr(context, builder, signature.args[0], args[0], args[1])
            yp = _vec16_ptr(context, builder, signature.args[2], args[2], args[3])
            prod = builder.fmul(builder.load(xp, align=4), builder.load(yp, align=4))
            fn = cgutils.get_or_insert_function(
                builder.module, _llvm_ir.FunctionType(f32, [f32, v16]), "llvm.vector.reduce.fadd.v16f32"
            )
            return builder.call(fn, [_llvm_ir.Constant(f32, 0.0), prod], fastmath=("reassoc", "nsz"))

        return sig, codegen
