"""Build of the two compiled parts: the CPU Gaussian sampler (src/dptorch/_gaussian_kernel.c)
and secure mode's float64 Box-Muller transform (src/dptorch/_secure_gaussian.c).

Everything else is declared in pyproject.toml. Both extensions are optional: where no C
compiler is available the install still succeeds and dptorch computes the same things with
torch (``dptorch.cpu_sampler.cpu_sampler()`` and
``dptorch.secure_random.compiled_transform_available()`` say which is in use).
"""

from __future__ import annotations

import sys
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

if sys.platform == "win32":
    compile_args = ["/O2", "/fp:precise"]
else:
    # No contraction into fused multiply-adds: the vector and scalar builds then give the
    # same bits. No errno or trap bookkeeping, which would keep the math loops scalar.
    compile_args = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]

# On Linux, torch's wheels run on libgomp.so.1; a kernel built with -fopenmp links the same
# soname, so the loader gives it torch's runtime and its threads (see fill_chunks in the C
# file). Elsewhere torch brings another OpenMP runtime, which a second one would compete with.
OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []


class BuildWithOptionalOpenMP(build_ext):  # type: ignore[misc]
    """Build with OpenMP where the compiler has it; without it (one thread) where not."""

    def build_extension(self, ext: Any) -> None:
        if not OPENMP_FLAGS:
            super().build_extension(ext)
            return
        plain_compile, plain_link = list(ext.extra_compile_args), list(ext.extra_link_args)
        ext.extra_compile_args = plain_compile + OPENMP_FLAGS
        ext.extra_link_args = plain_link + OPENMP_FLAGS
        try:
            super().build_extension(ext)
        except Exception as error:  # any compiler or linker failure
            print(
                f"dptorch: building {ext.name} with OpenMP failed ({error}); building it "
                "without (it then runs on one thread, or on Python threads where it can)"
            )
            ext.extra_compile_args, ext.extra_link_args = plain_compile, plain_link
            super().build_extension(ext)


setup(
    cmdclass={"build_ext": BuildWithOptionalOpenMP},
    ext_modules=[
        Extension(
            "dptorch._gaussian_kernel",
            sources=["src/dptorch/_gaussian_kernel.c"],
            extra_compile_args=compile_args,
            optional=True,
        ),
        Extension(
            "dptorch._secure_gaussian",
            sources=["src/dptorch/_secure_gaussian.c"],
            extra_compile_args=compile_args,
            optional=True,
        ),
    ],
)
