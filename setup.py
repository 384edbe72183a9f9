"""Packaging beyond what pyproject.toml can say: the top-level conf/ ships inside the wheel.

The repository keeps Hydra's configuration at the top level (conf/); installed, it becomes the
package ``lifelong_moe.conf``, which ``lifelong_moe.cli`` finds when there is no source tree.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["lifelong_moe", "lifelong_moe.*"]), "lifelong_moe.conf"],
    package_dir={"lifelong_moe.conf": "conf"},
    package_data={"lifelong_moe.conf": ["*.yaml", "*/*.yaml", "*/*/*.yaml", "*/*/*/*.yaml"]},
)
