"""What `qubax serve` reads of a request body before it answers, over raw sockets: every route bounds
its body, and a request refused on its head alone (no key, no console session) is answered before any
of its body is sent, and the connection closed.

The requests below send a head and no body: an answer that came at all was made without the body.
Had the server waited for it, the answer would be the body timeout's 408."""

import contextlib
from collections.abc import Iterator

import httpx
import pytest

from tests.test_admin import TOKEN
from tests.test_connection import answer, connected, error_code, served, status

HUGE = 2_000_000_000  # a declared body no route takes
UPLOAD_LIMIT = 2 * 1024 * 1024
WITHIN_UPLOAD_LIMIT = UPLOAD_LIMIT - 1024  # but far past a console form's 16 KiB


class Server:
    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        admin = {"authorization": f"Bearer {TOKEN}"}
        self.key = httpx.post(f"{self.url}/admin/keys", json={"test": True}, headers=admin).json()["key"]
        browser = httpx.Client(base_url=self.url, headers={"origin": self.url})
        assert browser.post("/console/sign-in", data={"token": TOKEN}).status_code == 303
        self.cookie = f"qubax_console={browser.cookies['qubax_console']}"

    def head(self, method_path: str, length: int, content_type: str, *headers: str) -> bytes:
        lines = [
            f"{method_path} HTTP/1.1",
            f"host: 127.0.0.1:{self.port}",
            f"origin: {self.url}",
            f"content-type: {content_type}",
            f"content-length: {length}",
            *headers,
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def refused(self, head: bytes) -> bytes:
        """The server's whole answer to a head sent without its body; returns once the server closed."""
        with connected(self.port) as sock:
            sock.sendall(head)
            return answer(sock)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    variables = {
        "QUBAX_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        "QUBAX_BODY_TIMEOUT_SECONDS": "5",
        "QUBAX_ACCESS_LOG": "false",
    }
    with served(tmp_path_factory.mktemp("bodies"), QUBAX_ADMIN_TOKEN=TOKEN, **variables) as port:
        yield Server(port)


FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data; boundary=qubax"


def test_sign_in_refuses_a_large_form_before_reading_it(server: Server) -> None:
    response = server.refused(server.head("POST /console/sign-in", HUGE, FORM))

    assert (status(response), error_code(response)) == (413, "request_too_large")


def test_sign_in_stops_a_chunked_body_past_a_few_kib(server: Server) -> None:
    head = f"POST /console/sign-in HTTP/1.1\r\nhost: 127.0.0.1:{server.port}\r\norigin: {server.url}\r\n"
    sent = 0
    with connected(server.port) as sock:
        sock.sendall(f"{head}content-type: {FORM}\r\ntransfer-encoding: chunked\r\n\r\n".encode())
        with contextlib.suppress(ConnectionError):
            for _ in range(1600):  # 100 MB, were it all taken
                sock.sendall(b"10000\r\n" + b"a" * 65536 + b"\r\n")
                sent += 65536
        response = answer(sock)

    assert (status(response), error_code(response)) == (413, "request_too_large")
    assert sent < 50_000_000  # what the socket buffers held before the server closed


def test_a_console_form_is_bounded_even_with_a_session(server: Server) -> None:
    head = server.head("POST /console/keys", WITHIN_UPLOAD_LIMIT, FORM, f"cookie: {server.cookie}")

    response = server.refused(head)

    assert (status(response), error_code(response)) == (413, "request_too_large")


def test_the_playground_checks_the_session_before_reading_the_upload(server: Server) -> None:
    response = server.refused(server.head("POST /console/playground", WITHIN_UPLOAD_LIMIT, MULTIPART))
    streamed = server.refused(server.head("POST /console/playground/stream", WITHIN_UPLOAD_LIMIT, MULTIPART))

    assert (status(response), error_code(response)) == (401, "no_session")
    assert (status(streamed), error_code(streamed)) == (401, "no_session")


def test_the_playground_upload_is_bounded_like_the_edits_endpoint(server: Server) -> None:
    head = server.head("POST /console/playground", UPLOAD_LIMIT + 1, MULTIPART, f"cookie: {server.cookie}")

    response = server.refused(head)

    assert (status(response), error_code(response)) == (413, "request_too_large")


def test_the_admin_api_refuses_a_body_past_one_mib_before_reading_it(server: Server) -> None:
    response = server.refused(server.head("POST /admin/keys", HUGE, "application/json"))

    assert (status(response), error_code(response)) == (413, "request_too_large")


@pytest.mark.parametrize("authorization", [[], ["authorization: Bearer qbx_test_wrong"]])
def test_edits_without_a_valid_key_are_refused_before_the_upload_is_read(
    server: Server, authorization: list[str]
) -> None:
    response = server.refused(server.head("POST /v1/images/edits", WITHIN_UPLOAD_LIMIT, MULTIPART, *authorization))

    assert status(response) == 401
    assert error_code(response) in ("missing_api_key", "invalid_api_key")


def test_edits_with_a_valid_key_are_bounded_by_the_upload_limit(server: Server) -> None:
    head = server.head("POST /v1/images/edits", UPLOAD_LIMIT + 1, MULTIPART, f"authorization: Bearer {server.key}")

    response = server.refused(head)

    assert (status(response), error_code(response)) == (413, "request_too_large")
