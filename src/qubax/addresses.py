"""Which IP addresses are public: where a node may send what a user chose (webhook targets), and what
an upstream on the internet could call back (upstream callbacks)."""

import ipaddress

# IPv6 prefixes whose addresses carry an IPv4 address in their last 32 bits: a NAT64 translator
# (RFC 6052's well-known prefix) or the host itself (RFC 4291's deprecated IPv4-compatible form) sends on
# to it. RFC 8215's local-use NAT64 prefix may carry it elsewhere, and is never a public target.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def public(address: str) -> bool:
    """Whether an address is global, and so is every IPv4 address it leads to."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip in LOCAL_NAT64:
        return False
    return all(one.is_global and not one.is_multicast for one in [ip, *carried(ip)])


def carried(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses that an IPv6 address reaches, mapped, translated or tunnelled (6to4, Teredo's
    client): Python's `is_global` judges only the IPv6 address."""
    if isinstance(ip, ipaddress.IPv4Address):
        return []
    found = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None]
    if ip in NAT64 or ip in IPV4_COMPATIBLE:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [one for one in found if one is not None]
