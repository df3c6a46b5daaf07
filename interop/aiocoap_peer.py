#!/usr/bin/env python3
"""An independent OSCORE peer for interop tests, built on aiocoap.

  aiocoap_peer.py server CONTEXT_DIR PORT
      Serves OSCORE-protected /hello (GET -> "hello from aiocoap") and /echo
      (POST -> the request payload) on 127.0.0.1:PORT; prints "ready PORT".
  aiocoap_peer.py client CONTEXT_DIR URI METHOD [PAYLOAD]
      Sends one OSCORE-protected request; prints "code CODE" and "payload HEX".

CONTEXT_DIR holds aiocoap's settings.json (sender-id_hex, recipient-id_hex,
secret_hex, salt_hex, algorithm, kdf-hashfun).
"""
import asyncio
import sys

import aiocoap
import aiocoap.oscore
import aiocoap.resource as resource
from aiocoap.credentials import CredentialsMap
from aiocoap.oscore_sitewrapper import OscoreSiteWrapper


class Hello(resource.Resource):
    async def render_get(self, request):
        return aiocoap.Message(payload=b"hello from aiocoap")


class Echo(resource.Resource):
    async def render_post(self, request):
        return aiocoap.Message(code=aiocoap.CHANGED, payload=request.payload)


async def server(context_dir, port):
    site = resource.Site()
    site.add_resource(["hello"], Hello())
    site.add_resource(["echo"], Echo())
    credentials = CredentialsMap()
    credentials[":peer"] = aiocoap.oscore.FilesystemSecurityContext(context_dir)
    wrapped = OscoreSiteWrapper(site, credentials)
    # UDP only: the other transports would also bind TCP (and WebSocket)
    # ports, which other tests' listeners may hold.
    await aiocoap.Context.create_server_context(wrapped, bind=("127.0.0.1", int(port)), transports=["udp6"])
    print("ready", port, flush=True)
    await asyncio.get_running_loop().create_future()


async def client(context_dir, uri, method, payload=""):
    ctx = await aiocoap.Context.create_client_context()
    base = uri.split("/", 3)
    ctx.client_credentials.load_from_dict({"/".join(base[:3]) + "/*": {"oscore": {"basedir": context_dir}}})
    code = {"GET": aiocoap.GET, "POST": aiocoap.POST, "PUT": aiocoap.PUT}[method]
    request = aiocoap.Message(code=code, uri=uri, payload=payload.encode())
    response = await asyncio.wait_for(ctx.request(request).response, 20)
    print("code", response.code.dotted, flush=True)
    print("payload", response.payload.hex(), flush=True)
    await ctx.shutdown()


def main():
    mode = sys.argv[1]
    if mode == "server":
        asyncio.run(server(sys.argv[2], sys.argv[3]))
    elif mode == "client":
        asyncio.run(client(*sys.argv[2:]))
    else:
        sys.exit("usage: aiocoap_peer.py server|client ...")


if __name__ == "__main__":
    main()
