"""The floor: the thinnest useful aiohttp passthrough proxy, to measure spendgate against.

One shared ClientSession; method, path, query, body and end-to-end headers go upstream;
the status, headers (Content-Length included, as spendgate keeps it when it does not
edit the body) and body bytes come back chunk by chunk as they arrive.

    python -m bench.floor_proxy --port 9002 --upstream http://127.0.0.1:9001
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer"}
REQUEST_DROP = HOP | {"host", "content-length"}  # aiohttp sets both for the upstream


def make_app(upstream: str) -> web.Application:
    async def start(app: web.Application) -> None:
        app["client"] = aiohttp.ClientSession(
            auto_decompress=False, connector=aiohttp.TCPConnector(limit=0)
        )

    async def stop(app: web.Application) -> None:
        await app["client"].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in REQUEST_DROP}
        async with request.app["client"].request(
            request.method,
            upstream + request.rel_url.raw_path_qs,
            headers=headers,
            data=await request.read(),
            allow_redirects=False,
        ) as up:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():
                if k.lower() not in HOP:
                    resp.headers.add(k, v)
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    args = p.parse_args()
    try:  # the same event loop as ``spendgate serve`` picks, for a fair comparison
        import uvloop  # type: ignore[import-not-found,unused-ignore]

        uvloop.install()  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        pass
    web.run_app(
        make_app(args.upstream.rstrip("/")),
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
