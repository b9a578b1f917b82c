"""Machines in Linux network namespaces, for the failover tests and benchmark: a namespace
joined to this one by a veth pair, whose link can be cut without either side seeing a reset
(a network partition). Needs root and iproute2's `ip`."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass

PORT = 5555


def namespaces_unavailable() -> str | None:
    """Why machines cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns)"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2's `ip` command"
    return None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Machine:
    """A network namespace with the address 10.77.SUBNET.2, this side being .1."""

    name: str
    subnet: int

    def __post_init__(self) -> None:
        tag = f"{os.getpid() % 100000}{self.name[-1]}"  # interface names: 15 bytes at most
        self.host_if, self.inner_if = f"zfh{tag}", f"zfi{tag}"
        self.netns = f"zpfail-{os.getpid()}-{self.name}"

    @property
    def address(self) -> str:
        return f"10.77.{self.subnet}.2"

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.address}:{PORT}"

    @property
    def prefix(self) -> tuple[str, ...]:
        """The command that runs a program on this machine."""
        return ("ip", "netns", "exec", self.netns)

    def create(self) -> Machine:
        ip("netns", "add", self.netns)
        ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.inner_if,
           "netns", self.netns)
        ip("addr", "add", f"10.77.{self.subnet}.1/24", "dev", self.host_if)
        ip("link", "set", self.host_if, "up")
        inside = ("netns", "exec", self.netns, "ip")
        ip(*inside, "addr", "add", f"{self.address}/24", "dev", self.inner_if)
        ip(*inside, "link", "set", self.inner_if, "up")
        ip(*inside, "link", "set", "lo", "up")
        return self

    def cut(self) -> None:
        """Its link goes down inside the namespace: packets vanish, nobody sends a reset."""
        ip("netns", "exec", self.netns, "ip", "link", "set", self.inner_if, "down")

    def heal(self) -> None:
        ip("netns", "exec", self.netns, "ip", "link", "set", self.inner_if, "up")

    def delete(self) -> None:
        for args in (("link", "del", self.host_if), ("netns", "del", self.netns)):
            with contextlib.suppress(subprocess.CalledProcessError):
                ip(*args)
