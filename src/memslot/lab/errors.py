"""The lab's failures: ``OSError`` subclasses whose errno says what kind of failure it was, each
with a one-line message for the command line."""

from __future__ import annotations

import errno

from ..errors import MemslotError


class LabError(MemslotError, OSError):
    """A lab failure; ``str()`` is one line."""

    default_errno = errno.EIO

    def __init__(self, message: str) -> None:
        super().__init__(self.default_errno, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ToolMissing(LabError):
    """A host program (QEMU, apt-get, dpkg-deb) is not installed."""

    default_errno = errno.ENOENT


class ArchiveUnreachable(LabError):
    """The Debian archive could not be reached (network, mirror or signature trouble)."""

    default_errno = errno.ENETUNREACH


class PackageMissing(LabError):
    """The archive does not list a package the target needs, or its pool cannot serve any
    listed version of it."""

    default_errno = errno.ENOPKG


class ImageError(LabError):
    """A boot image could not be built from the packages (unexpected package layout)."""

    default_errno = errno.EINVAL


class GuestHang(LabError):
    """The guest did not finish in time, or its kernel reported a lockup or panic."""

    default_errno = errno.ETIMEDOUT

    def __init__(self, message: str, log_tail: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.log_tail = log_tail


class Cancelled(Exception):
    """A run was called off (Ctrl-C on a parallel matrix): its guest has been ended. Not a
    :class:`LabError`: no row is made of it."""


class UnknownTarget(LabError):
    """A target name that is not ARCH:VERSION of a listed target."""

    default_errno = errno.EINVAL
