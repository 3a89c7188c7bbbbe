"""The HTTP side of the worker library and the admin client: CBOR over httpx."""

from __future__ import annotations

import json
import logging
from typing import Any

import cbor2
import httpx

from plan_runtime.state import StateError, decode_message

__all__ = ["Connection", "ServerError", "base_url"]

logger = logging.getLogger(__name__)

CBOR_TYPE = "application/cbor"


class ServerError(Exception):
    """The server refused a request; ``code`` is its stable error code.

    Attributes:
        status: the HTTP status.
        code: the server's stable error code (see the README's error table).
        message: the server's explanation.
    """

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def base_url(address: str, secure: bool) -> str:
    """``"127.0.0.1:7000"`` -> ``"http://127.0.0.1:7000"``; full URLs pass through."""
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    scheme = "https" if secure else "http"
    return f"{scheme}://{address.rstrip('/')}"


class Connection:
    """One keep-alive HTTP client speaking CBOR to a nimble-edge server."""

    def __init__(
        self,
        address: str,
        *,
        secure: bool = False,
        token: str | None = None,
        timeout_s: float = 60.0,
    ):
        headers = {"Accept": CBOR_TYPE}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.url = base_url(address, secure)
        self._client = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout_s
        )

    def close(self) -> None:
        self._client.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        """Send one request; raise :class:`ServerError` on any error status.

        ``body`` is encoded as CBOR; ``content`` is sent as raw bytes.
        """
        headers = {}
        if body is not None:
            content = cbor2.dumps(body)
            headers["Content-Type"] = CBOR_TYPE
        response = self._client.request(
            method, path, content=content, params=params, headers=headers
        )
        if response.status_code >= 400:
            raise _server_error(response)
        return response

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send a control message and decode the CBOR answer."""
        response = self.request(method, path, **kwargs)
        try:
            return decode_message(response.content)
        except StateError as exc:
            raise ServerError(
                response.status_code, "invalid_response", f"unreadable answer: {exc}"
            ) from exc


def _server_error(response: httpx.Response) -> ServerError:
    try:
        if response.headers.get("content-type", "").startswith("application/json"):
            envelope = json.loads(response.content)
        else:
            envelope = decode_message(response.content)
        return ServerError(response.status_code, envelope["code"], envelope["error"])
    except (StateError, KeyError, TypeError, ValueError):
        text = response.text[:200]
        return ServerError(response.status_code, "http_error", text)
