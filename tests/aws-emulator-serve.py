#!/usr/bin/env python3
"""moto_server, with DynamoDB requests serialized.

moto's server handles requests on threads, and its DynamoDB backend checks a condition and
writes the item without a lock, so two concurrent conditional updates of one item can both
succeed: real DynamoDB never allows that, and the bridge's exactly-once claim depends on it
(cloud-bridge/tests/pipeline.rs `concurrent_bridges_store_each_edge_seq_once` stored an event
twice about one run in six). One lock around every DynamoDB request gives the emulator the
per-item atomicity the real service has. Everything else stays concurrent.

Usage: aws-emulator-serve.py HOST PORT
PORT 0 picks a free port; either way the first line on stdout, once the socket listens, is
"aws-emulator listening on http://HOST:PORT" with the port it got (tests/src/moto.rs reads it).
"""

import sys
import threading

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

DYNAMODB = threading.Lock()
app = DomainDispatcherApplication(create_backend_app)


def serialized(environ, start_response):
    if environ.get("HTTP_X_AMZ_TARGET", "").startswith("DynamoDB_"):
        with DYNAMODB:
            # Consume the whole response inside the lock: the write happens while it is built.
            return [b"".join(app(environ, start_response))]
    return app(environ, start_response)


if __name__ == "__main__":
    host, port = sys.argv[1], int(sys.argv[2])
    # run_simple's server, made here so that the bound port (port 0: a free one) can be told.
    server = make_server(host, port, serialized, threaded=True, request_handler=MotoRequestHandler)
    print(f"aws-emulator listening on http://{host}:{server.port}", flush=True)
    server.serve_forever()
