"""The optional C part of vfiouser: the serving thread's hot loop (vfiouser/_fastloop.c).

Everything else is in pyproject.toml. The extension is optional: without a C compiler and
Python's headers the package installs without it and serves with the pure-Python loop.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("vfiouser._fastloop", ["vfiouser/_fastloop.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"])])
