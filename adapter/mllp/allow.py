"""Who may send: the listener's allow-lists of sender networks (CIDR) and sending facilities (MSH-4)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from adapter.errors import RefusedSender


@dataclass(frozen=True, slots=True)
class AllowList:
    """Empty lists allow everyone; a sender must pass both lists that are set."""

    networks: Sequence[IPv4Network | IPv6Network] = ()
    facilities: Sequence[str] = ()

    def check(self, peer: str, sending_facility: str) -> None:
        """Raise RefusedSender (AR) naming what did not match; `peer` is "address:port"."""
        if self.networks:
            host = peer.rsplit(":", 1)[0].strip("[]")
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                raise RefusedSender(f"sender address {host!r} is not an IP address on mllp.allow_networks") from None
            if not any(address in network for network in self.networks):
                raise RefusedSender(f"sender address {address} is not on mllp.allow_networks")
        if self.facilities and sending_facility not in self.facilities:
            raise RefusedSender(
                f"sending facility {sending_facility or '(empty)'} is not on mllp.allow_facilities", location="MSH-4"
            )
