"""``Closing``: the context-manager half of anything with a ``close()``."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """``with obj:`` closes ``obj`` on the way out, even when the block raised."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
