"""The one compiled piece of cotune: the backrazor kernels (`memory.backward`), a small C
extension. Optional: where it cannot be built (no C compiler), cotune.memory.kernels
falls back to numpy with the same results. Everything else is in pyproject.toml."""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cotune.memory._bitpack",
            sources=["src/cotune/memory/_bitpack.c"],
            optional=True,
            extra_compile_args=[] if sys.platform == "win32" else ["-O3"],
        )
    ]
)
