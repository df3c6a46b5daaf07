#!/usr/bin/env python3
"""An independent ATLS-over-HTTP client: pyOpenSSL with a memory BIO.

    pyopenssl_client.py BASE_URL CA_FILE SERVER_NAME TLS_VERSION

Drives a TLS handshake whose flights are POSTed to /.well-known/atls as
application/atls, sends one record-mode request (HTTP/1.1 inside TLS) for
GET /session, then exports the `atls-oscore` keys (empty context, RFC 5705),
derives an OSCORE context with aiocoap (no CIDs: the fallback IDs, client
Sender ID h'' and Recipient ID h'01') and makes an OSCORE request for
GET /session through the RFC 8613 section 11 HTTP mapping.

Prints "records <body>", "oscore <body>" and "suite <name>" lines.
"""

import asyncio
import base64
import http.client
import json
import sys
import tempfile
import urllib.parse

from OpenSSL import SSL

import aiocoap
import aiocoap.oscore
from aiocoap import numbers
from aiocoap.message import Direction

# draft-friel-tls-atls section 10 for the suites OpenSSL negotiates here:
# (COSE algorithm name in aiocoap, key length, HKDF hash).
SUITES = {
    "TLS_AES_128_GCM_SHA256": ("A128GCM", 16, "sha256"),
    "TLS_AES_256_GCM_SHA384": ("A256GCM", 32, "sha384"),
    "TLS_CHACHA20_POLY1305_SHA256": ("ChaCha20/Poly1305", 32, "sha384"),
    "ECDHE-ECDSA-AES128-GCM-SHA256": ("A128GCM", 16, "sha256"),
    "ECDHE-ECDSA-AES256-GCM-SHA384": ("A256GCM", 32, "sha384"),
    "ECDHE-ECDSA-CHACHA20-POLY1305": ("ChaCha20/Poly1305", 32, "sha384"),
}


class Peer:
    def __init__(self, base, ca_file, server_name, version):
        self.url = urllib.parse.urlsplit(base)
        self.cookie = None
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_verify(SSL.VERIFY_PEER, lambda *args: args[-1])
        ctx.load_verify_locations(ca_file)
        v = SSL.TLS1_3_VERSION if version == "1.3" else SSL.TLS1_2_VERSION
        ctx.set_min_proto_version(v)
        ctx.set_max_proto_version(v)
        self.conn = SSL.Connection(ctx, None)  # None: memory BIOs
        self.conn.set_tlsext_host_name(server_name.encode())
        self.conn.set_connect_state()
        self.server_name = server_name

    def post(self, path, content_type, body, extra=None):
        c = http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=10)
        headers = {"Content-Type": content_type}
        if self.cookie:
            headers["Cookie"] = self.cookie
        headers.update(extra or {})
        c.request("POST", path, body=body, headers=headers)
        r = c.getresponse()
        data = r.read()
        for name, value in r.getheaders():
            if name.lower() == "set-cookie" and value.startswith("atls-session="):
                self.cookie = value.split(";", 1)[0]
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), data

    def pending(self):
        out = b""
        while True:
            try:
                chunk = self.conn.bio_read(65536)
            except SSL.WantReadError:
                return out
            if not chunk:
                return out
            out += chunk

    def flight(self, body):
        status, headers, data = self.post("/.well-known/atls", "application/atls", body)
        if status != 200 or headers.get("content-type") != "application/atls":
            raise SystemExit(f"handshake flight refused: {status} {data[:200]!r}")
        if data:
            self.conn.bio_write(data)

    def handshake(self):
        while True:
            try:
                self.conn.do_handshake()
                return
            except SSL.WantReadError:
                out = self.pending()
                if not out:
                    raise SystemExit("handshake stalled")
                self.flight(out)

    def record_request(self, path):
        host = f"{self.url.hostname}:{self.url.port}"
        self.conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\ncontent-length: 0\r\n\r\n".encode())
        # The client's Finished (TLS 1.3) rides with the request.
        self.flight(self.pending())
        data = b""
        while True:
            try:
                data += self.conn.recv(65536)
            except (SSL.WantReadError, SSL.ZeroReturnError):
                break
        head, _, body = data.partition(b"\r\n\r\n")
        status = head.split(b" ")[1].decode()
        if status != "200":
            raise SystemExit(f"record-mode request answered {status}")
        return body

    def oscore_context(self, directory):
        suite = self.conn.get_cipher_name()
        alg, key_len, hkdf = SUITES[suite]
        # draft section 9.1: label atls-oscore, EMPTY (zero-length) context,
        # 2 x key length; first half Master Secret, second half Master Salt.
        exported = self.conn.export_keying_material(b"atls-oscore", 2 * key_len, b"")
        settings = {
            "sender-id_hex": "",
            "recipient-id_hex": "01",
            "secret_hex": exported[:key_len].hex(),
            "salt_hex": exported[key_len:].hex(),
            "algorithm": alg,
            "kdf-hashfun": hkdf,
        }
        with open(f"{directory}/settings.json", "w") as f:
            json.dump(settings, f)
        return suite, aiocoap.oscore.FilesystemSecurityContext(directory)

    def oscore_request(self, ctx, path):
        request = aiocoap.Message(code=aiocoap.GET, uri_path=tuple(p for p in path.split("/") if p))
        protected, request_id = ctx.protect(request)
        option = protected.opt.oscore
        header = base64.urlsafe_b64encode(option).rstrip(b"=").decode() if option else "AA"
        status, headers, data = self.post("/", "application/oscore", protected.payload, {"OSCORE": header})
        if status != 200 or headers.get("content-type") != "application/oscore":
            raise SystemExit(f"OSCORE request refused: {status} {data[:200]!r}")
        value = headers["oscore"]
        option = b"" if value == "AA" else base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        response = aiocoap.Message(code=numbers.codes.Code.CHANGED, payload=data)
        response.opt.oscore = option
        response.direction = Direction.INCOMING  # as if parsed off the wire
        plain, _ = ctx.unprotect(response, request_id)
        if plain.code != numbers.codes.Code.CONTENT:
            raise SystemExit(f"OSCORE inner response {plain.code}")
        return plain.payload


def main():
    base, ca_file, server_name, version = sys.argv[1:5]
    peer = Peer(base, ca_file, server_name, version)
    peer.handshake()
    print("records", peer.record_request("/session").decode(), flush=True)
    # aiocoap keeps the context's sequence number in the directory until exit.
    directory = tempfile.mkdtemp()
    suite, ctx = peer.oscore_context(directory)
    print("suite", suite, flush=True)
    print("oscore", peer.oscore_request(ctx, "/session").decode(), flush=True)


if __name__ == "__main__":
    main()
