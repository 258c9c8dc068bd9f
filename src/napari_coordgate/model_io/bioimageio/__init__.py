"""bioimage.io model packages: export and import (:mod:`.package`); the architecture file that ships inside
every package (:mod:`.arch`, standalone: it imports only torch)."""

from .package import (
    PACKAGE_FORMAT,
    PackageError,
    describe_package,
    export_package,
    is_package,
    load_any,
    load_package,
)

__all__ = [
    "PACKAGE_FORMAT", "PackageError", "describe_package", "export_package", "is_package", "load_any", "load_package",
]
