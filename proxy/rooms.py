"""The notebook rooms the proxy has joined, shared by whoever writes into them (the Y fold) and
whoever reads cells from them (the server-side executor): one Y client per notebook, joined on
first use and left a while after its last user let go (the server saves ~1 s after a change)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from .relay import Background
from .yroom import CollaborationUnavailable, NotebookRoom

#: Seconds a room stays joined after its last user let go of it.
ROOM_LINGER = 5.0


class RoomPool:
    """Reference-counted rooms by notebook path: every :meth:`join` (or :meth:`share`) is
    matched by one :meth:`leave` (or :meth:`leave_later`)."""

    def __init__(self, room_for: Callable[[str], NotebookRoom], background: Background) -> None:
        self.room_for = room_for
        self.background = background
        self.rooms: dict[str, NotebookRoom] = {}
        self._users: dict[str, int] = {}
        #: called when a room was joined again with a fresh document (upstream restart,
        #: dropped connection): what its users wrote there must be written anew
        self.on_fresh_document: list[Callable[[NotebookRoom], Awaitable[None]]] = []

    async def join(self, path: str) -> NotebookRoom:
        """The room of a notebook, joined (or shared) and synced."""
        room = self.rooms.get(path)
        if room is None:
            room = self.rooms[path] = self.room_for(path)
            room.on_new_document.append(lambda: self._fresh(room))
            room.start()
        self._users[path] = self._users.get(path, 0) + 1
        try:
            await room.ready()
        except CollaborationUnavailable:
            self.leave(path)
            raise
        return room

    def share(self, path: str) -> NotebookRoom | None:
        """The room of a notebook if it is joined already (then it is shared), else None."""
        room = self.rooms.get(path)
        if room is not None:
            self._users[path] += 1
        return room

    def _fresh(self, room: NotebookRoom) -> None:
        for callback in self.on_fresh_document:
            self.background.run(callback(room))

    def leave(self, path: str) -> None:
        self._users[path] = self._users.get(path, 1) - 1
        if self._users[path] <= 0:
            del self._users[path]
            room = self.rooms.pop(path, None)
            if room is not None:
                self.background.run(room.close())

    def leave_later(self, path: str) -> None:
        """Leave once `ROOM_LINGER` has passed: the next write often comes soon."""
        asyncio.get_running_loop().call_later(ROOM_LINGER, self.leave, path)

    async def close(self) -> None:
        for room in list(self.rooms.values()):
            with contextlib.suppress(Exception):
                await room.close()
        self.rooms.clear()
        self._users.clear()
