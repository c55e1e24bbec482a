"""One guest connection to one host service: QEMU's `guestfwd=...-cmd:` runs
this per connection, with the guest's socket on stdin/stdout. Connecting per
connection (not once at QEMU start, as a chardev would) lets the host service
be down at boot and come back later, as a real broker does."""

import os
import selectors
import socket
import sys


def main() -> int:
    try:
        upstream = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
    except OSError:
        return 1  # the guest sees its connection closed, as with a refused connect
    upstream.settimeout(None)
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ)
    sel.register(upstream, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj == 0:
                data = os.read(0, 65536)
                if not data:
                    return 0
                upstream.sendall(data)
            else:
                data = upstream.recv(65536)
                if not data:
                    return 0
                view = memoryview(data)
                while view:
                    view = view[os.write(1, view) :]


if __name__ == "__main__":
    sys.exit(main())
