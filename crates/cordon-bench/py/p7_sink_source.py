"""P7's two TCP services, run inside the sandbox and on the host alike.

argv: sink port, source port (0: any). Prints the bound ports, then serves forever.
sink: reads to EOF, then answers with the byte count (ASCII) and closes.
source: reads an 8-byte big-endian count, sends that many zero bytes and closes.
"""
import socket
import sys
import threading

CHUNK = 1 << 20


def listen(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(16)
    return s


def sink(c):
    buf = bytearray(CHUNK)
    total = 0
    while True:
        n = c.recv_into(buf)
        if not n:
            break
        total += n
    c.sendall(str(total).encode())
    c.close()


def source(c):
    header = b""
    while len(header) < 8:
        more = c.recv(8 - len(header))
        if not more:
            c.close()
            return
        header += more
    left = int.from_bytes(header, "big")
    zeros = memoryview(bytes(CHUNK))
    while left > 0:
        n = min(left, CHUNK)
        c.sendall(zeros[:n])
        left -= n
    c.close()


def serve(listener, handler):
    while True:
        c, _ = listener.accept()
        threading.Thread(target=handler, args=(c,), daemon=True).start()


sink_listener = listen(int(sys.argv[1]))
source_listener = listen(int(sys.argv[2]))
print(sink_listener.getsockname()[1], source_listener.getsockname()[1], flush=True)
threading.Thread(target=serve, args=(sink_listener, sink), daemon=True).start()
serve(source_listener, source)
