"""Which hosts an upstream's URLs may take us to (qubax.providers.hosts)."""

import pytest

from qubax.providers import hosts


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://delivery.eu1.bfl.ai/results/x.png", True),  # a provider host, https on its standard port
        ("https://delivery.eu1.bfl.ai:443/results/x.png", True),
        ("http://delivery.eu1.bfl.ai/results/x.png", False),  # never plain http to a provider host
        ("https://delivery.eu1.bfl.ai:8443/results/x.png", False),  # nor another port of it
        ("https://evil.example/x.png", False),
        ("http://127.0.0.1:5000/files/x.png", True),  # the configured base URL's own origin (a fake, a proxy)
        ("http://127.0.0.1:5001/files/x.png", False),  # another port of that host
        ("https://127.0.0.1:5000/files/x.png", False),  # another scheme
        ("http://127.0.0.1:bad/x.png", False),
        ("file:///etc/passwd", False),
    ],
)
def test_only_the_base_origin_and_provider_hosts_over_https_are_trusted(url: str, allowed: bool) -> None:
    assert hosts.trusted(url, ("delivery.*.bfl.ai",), "http://127.0.0.1:5000") is allowed
