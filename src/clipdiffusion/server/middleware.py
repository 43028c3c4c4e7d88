"""ASGI middleware for the two rules that guard every route, pages and docs included: HTTP basic auth and the
request body size limit. Plain ASGI (not FastAPI dependencies) so that no route can be added without them."""

from __future__ import annotations

import base64
import binascii
import json
import secrets


async def _send_json(send, status: int, body: dict, headers: tuple = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


class BasicAuth:
    """Every HTTP request needs one of `credentials` ((user, password) pairs) via HTTP basic auth, as A1111's
    --api-auth. Passwords are compared in constant time."""

    def __init__(self, app, credentials):
        self.app = app
        self.credentials = tuple((u.encode(), p.encode()) for u, p in credentials)

    def _allowed(self, header: bytes | None) -> bool:
        if not header or not header[:6].lower() == b"basic ":
            return False
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        ok = False
        for u, p in self.credentials:
            # Evaluate both comparisons for every pair: no early exit that would time the user name.
            ok |= secrets.compare_digest(user, u) & secrets.compare_digest(password, p) & bool(sep)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.credentials:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization")
        if not self._allowed(header):
            return await _send_json(send, 401, {"detail": "Incorrect username or password"},
                                    ((b"www-authenticate", b'Basic realm="clipdiffusion"'),))
        return await self.app(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413: from Content-Length before reading anything; a chunked
    upload (no Content-Length) is read here up to the limit and replayed, so an oversized body is never held."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self):
        return {"detail": [{"loc": ["body"], "type": "value_error",
                            "msg": f"request body size exceeds the maximum of {self.max_bytes} bytes"}]}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self.max_bytes
            except ValueError:
                return await _send_json(send, 400, {"detail": "invalid Content-Length header"})
            if too_large:
                return await _send_json(send, 413, self._too_large(), ((b"connection", b"close"),))
            return await self.app(scope, receive, send)
        if b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
            return await self.app(scope, receive, send)
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                return await _send_json(send, 413, self._too_large(), ((b"connection", b"close"),))
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay_receive():
            return replay.pop() if replay else await receive()

        return await self.app(scope, replay_receive, send)
