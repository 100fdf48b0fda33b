"""Build of the one compiled part, the CPU Gaussian sampler (src/dptorch/_gaussian_kernel.c).

Everything else is declared in pyproject.toml. The extension is optional: where no C compiler
is available the install still succeeds and dptorch draws CPU noise with torch's sampler
(``dptorch.cpu_sampler.cpu_sampler()`` says which is in use).
"""

from __future__ import annotations

import sys

from setuptools import Extension, setup

if sys.platform == "win32":
    compile_args = ["/O2", "/fp:precise"]
else:
    # No contraction into fused multiply-adds: the vector and scalar builds then give the
    # same bits. No errno or trap bookkeeping, which would keep the math loops scalar.
    compile_args = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]

setup(
    ext_modules=[
        Extension(
            "dptorch._gaussian_kernel",
            sources=["src/dptorch/_gaussian_kernel.c"],
            extra_compile_args=compile_args,
            optional=True,
        )
    ]
)
