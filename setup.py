"""The one native part: hoisted CKKS rotations (plugins/ckks/_native.c).

Everything else is in pyproject.toml. The extension is optional: without a C compiler the
package installs and the ckks plugin rotates with SEAL's own ``rotate_vector`` (the plan
and ``secureinfer doctor`` say which).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("secureinfer.plugins.ckks._native", ["plugins/ckks/_native.c"],
                             extra_compile_args=["-O3", "-std=c11"], optional=True)])
