"""`python benchmarks/missing_wheels.py WHEEL...`: print the wheels whose distribution this Python lacks.

gpu_suite.sh installs only those (benchmarks/gpu_prepare.sh ships the wheels): a second copy of a distribution the
GPU image already has, put ahead of it on PYTHONPATH, would shadow the image's own, a binary one built against
other libraries, or a test runner that the image's own plugins were written for.
"""
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def missing(wheels: list[str]) -> list[str]:
    lacking = []
    for wheel in wheels:
        name = re.sub(r"[-_.]+", "-", Path(wheel).name.split("-")[0]).lower()  # the wheel file's distribution
        try:
            version(name)
        except PackageNotFoundError:
            lacking.append(wheel)
    return lacking


if __name__ == "__main__":
    print("\n".join(missing(sys.argv[1:])))
