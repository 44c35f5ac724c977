"""A write prefetch for compiled kernels: numba has none.

Why: the DE keys' scatter (`nbglm.metrics.de`) writes to a hundred to a thousand block streams at
once, more than the CPU's own prefetchers follow, and waits on each stream's next cache line from
memory (a plain copy of the same keys costs 1.1 ns per key, the scatter 5-8). Asking for that line
a few keys ahead hides part of the wait.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def prefetch_for_write(typingctx, array, index):  # pragma: no cover - compiled
    """Ask for the cache line of ``array[index]`` (a contiguous array, index unchecked, in bounds) to be
    written soon. Only a hint: no fault, no effect on any value."""

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        item = cgutils.get_item_pointer(context, builder, array_type, view, [args[1]], wraparound=False,
                                        boundscheck=False)
        byte_pointer, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        prefetch = builder.module.declare_intrinsic(
            "llvm.prefetch", [byte_pointer], ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]))
        # for a write (1), kept in every cache level (3), data (1)
        builder.call(prefetch, [builder.bitcast(item, byte_pointer), i32(1), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen
