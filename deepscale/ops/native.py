"""ctypes signatures of the plain-C ops and small helpers to call them.

The CPU optimizer and async I/O ops are shared libraries with C entry points (see
op_builder/builder.py for why); this module declares their argument types once so every
call is checked by ctypes, and turns an error return into a Python exception.
"""
import ctypes

_I64P = ctypes.POINTER(ctypes.c_int64)
_I, _I64, _D, _P, _S = ctypes.c_int, ctypes.c_int64, ctypes.c_double, ctypes.c_void_p, ctypes.c_char_p

SIGNATURES = {
    "ds_last_error": (_S, []),
    "ds_simd_level": (_S, []),
    "ds_simd_width": (_I, []),
    "ds_adam_step": (_I, [_I64P, _I64, _I64, _D, _D, _D, _D, _D, _I, _I, _I]),
    "ds_adagrad_step": (_I, [_I64P, _I64, _I64, _D, _D, _D, _I]),
    "ds_lion_step": (_I, [_I64P, _I64, _I64, _D, _D, _D, _D, _I]),
    "ds_aio_create": (_P, [_I64, _I, _I, _I, _I, _I]),
    "ds_aio_destroy": (None, [_P]),
    "ds_aio_submit": (_I64, [_P, _I, _I64, _I64, _S, _I64]),
    "ds_aio_wait": (_I, [_P, _I64]),
}


def bind(lib):
    """Declare argument and return types of every known entry point ``lib`` exports; returns ``lib``."""
    for name, (restype, argtypes) in SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            continue
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def int64_array(values):
    """A ctypes int64 array holding ``values``."""
    return (ctypes.c_int64 * len(values))(*values)


def check(lib, rc, what):
    """Raise ValueError with the library's message when ``rc`` is non-zero."""
    if rc != 0:
        raise ValueError(f"{what} failed: {lib.ds_last_error().decode(errors='replace')}")


def simd_level(lib):
    """The SIMD level a CPU op library was compiled for."""
    return lib.ds_simd_level().decode()
