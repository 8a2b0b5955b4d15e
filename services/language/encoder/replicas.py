"""One encode replica as the client sees it: its stub and link, load, rotation and handshake
state."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from services.language.encoder.link import LinkReceiver
from services.language.encoder.rpc import EncodeStub
from services.language.encoder.shm import ShmReceiver


@dataclass(frozen=True)
class ReplicaStats:
    """What the client knows of one replica (for logs, metrics and tests)."""

    address: str
    admitted: bool  # in rotation; False while cooling down or until a health probe passes
    outstanding: int
    attempts: int  # calls sent to it, all outcomes
    failures: int  # of those, the ones that failed


class Replica:
    """One replica's stub, load, rotation state, handshake state and (link transport) link."""

    def __init__(self, stub: EncodeStub, link: LinkReceiver | None, shm: ShmReceiver | None = None):
        self.stub = stub
        self.address = stub.address
        self.link = link
        self.shm = shm
        self.outstanding = 0
        self.last_pick = 0
        self.admitted = True
        self.down_until = 0.0
        self.probe: asyncio.Task | None = None
        self.verified = False
        self.incompatible: str | None = None
        self.attempts = 0
        self.failures = 0

    def stats(self) -> ReplicaStats:
        return ReplicaStats(
            self.stub.address, self.admitted, self.outstanding, self.attempts, self.failures
        )
