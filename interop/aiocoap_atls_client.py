#!/usr/bin/env python3
"""An independent ATLS-over-CoAP client: aiocoap for CoAP (it does the
blockwise transfer of the flights), pyOpenSSL with memory BIOs for the TLS
handshake, and aiocoap's own OSCORE keyed from pyOpenSSL's export.

    aiocoap_atls_client.py HOST PORT CA_FILE SERVER_NAME TLS_VERSION

Each flight is a CoAP POST to /.well-known/atls with Content-Format 65000
(the project's experimental number for application/atls) and the flight's
TLS records as the payload; the server answers 2.04 with its flight. The
first one is answered 4.01 with an Echo option (RFC 9175): the server
validates the client's address before it keeps any state for it, and the
client repeats the request with the Echo value. Then
the `atls-oscore` export (empty context, RFC 5705) keys an OSCORE context
with the fallback IDs (pyOpenSSL offers no CIDs: client Sender ID h'',
Recipient ID h'01') for GET /hello and POST /echo.

Prints "suite <name>", "blocks <n>", "hello <payload>", "echo <ok>" and
"big <ok>" (a 3 KB POST, blockwise inside OSCORE both ways) lines.
"""

import asyncio
import json
import sys
import tempfile

from OpenSSL import SSL

import aiocoap
import aiocoap.oscore

CF_ATLS = 65000
SUITES = {
    "TLS_AES_128_GCM_SHA256": ("A128GCM", 16, "sha256"),
    "TLS_AES_256_GCM_SHA384": ("A256GCM", 32, "sha384"),
    "TLS_CHACHA20_POLY1305_SHA256": ("ChaCha20/Poly1305", 32, "sha384"),
    "ECDHE-ECDSA-AES128-GCM-SHA256": ("A128GCM", 16, "sha256"),
    "ECDHE-ECDSA-AES256-GCM-SHA384": ("A256GCM", 32, "sha384"),
    "ECDHE-ECDSA-CHACHA20-POLY1305": ("ChaCha20/Poly1305", 32, "sha384"),
}


def pending(conn):
    out = b""
    while True:
        try:
            chunk = conn.bio_read(65536)
        except SSL.WantReadError:
            return out
        if not chunk:
            return out
        out += chunk


async def main():
    host, port, ca_file, server_name, version = sys.argv[1:6]
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_verify(SSL.VERIFY_PEER, lambda *args: args[-1])
    ctx.load_verify_locations(ca_file)
    v = SSL.TLS1_3_VERSION if version == "1.3" else SSL.TLS1_2_VERSION
    ctx.set_min_proto_version(v)
    ctx.set_max_proto_version(v)
    conn = SSL.Connection(ctx, None)
    conn.set_tlsext_host_name(server_name.encode())
    conn.set_connect_state()

    protocol = await aiocoap.Context.create_client_context()
    flight_uri = f"coap://{host}:{port}/.well-known/atls"
    largest = 0

    async def flight(out):
        nonlocal largest
        largest = max(largest, len(out))
        request = aiocoap.Message(code=aiocoap.POST, uri=flight_uri, payload=out, content_format=CF_ATLS)
        response = await protocol.request(request).response
        if response.code == aiocoap.UNAUTHORIZED and response.opt.echo:
            # RFC 9175: the server validates this endpoint before it spends
            # any state on it; repeat the request with its Echo value.
            request = aiocoap.Message(code=aiocoap.POST, uri=flight_uri, payload=out, content_format=CF_ATLS)
            request.opt.echo = response.opt.echo
            response = await protocol.request(request).response
        if response.code != aiocoap.CHANGED:
            raise SystemExit(f"flight refused: {response.code} {response.payload[:200]!r}")
        largest = max(largest, len(response.payload))
        if response.payload:
            conn.bio_write(response.payload)

    while True:
        try:
            conn.do_handshake()
            break
        except SSL.WantReadError:
            out = pending(conn)
            if not out:
                raise SystemExit("handshake stalled")
            await flight(out)
    # The client's last flight (its Finished) may still be waiting.
    out = pending(conn)
    if out:
        await flight(out)
    print("blocks", largest, flush=True)

    suite = conn.get_cipher_name()
    alg, key_len, hkdf = SUITES[suite]
    exported = conn.export_keying_material(b"atls-oscore", 2 * key_len, b"")
    directory = tempfile.mkdtemp()
    with open(f"{directory}/settings.json", "w") as f:
        json.dump(
            {
                "sender-id_hex": "",
                "recipient-id_hex": "01",
                "secret_hex": exported[:key_len].hex(),
                "salt_hex": exported[key_len:].hex(),
                "algorithm": alg,
                "kdf-hashfun": hkdf,
            },
            f,
        )
    print("suite", suite, flush=True)
    protocol.client_credentials.load_from_dict(
        {f"coap://{host}:{port}/*": {"oscore": {"basedir": directory}}}
    )
    response = await protocol.request(aiocoap.Message(code=aiocoap.GET, uri=f"coap://{host}:{port}/hello")).response
    if response.code != aiocoap.CONTENT:
        raise SystemExit(f"GET /hello answered {response.code} {response.payload!r}")
    print("hello", response.payload.decode(), flush=True)
    body = bytes(range(256)) + b"x" * 44
    response = await protocol.request(
        aiocoap.Message(code=aiocoap.POST, uri=f"coap://{host}:{port}/echo", payload=body)
    ).response
    print("echo", "ok" if response.code == aiocoap.CHANGED and response.payload == body else f"bad {response.code}", flush=True)
    # Large enough for blockwise inside OSCORE, in both directions.
    big = bytes(range(256)) * 12
    response = await protocol.request(
        aiocoap.Message(code=aiocoap.POST, uri=f"coap://{host}:{port}/echo", payload=big)
    ).response
    print("big", "ok" if response.code == aiocoap.CHANGED and response.payload == big else f"bad {response.code} {len(response.payload)}", flush=True)
    await protocol.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
