"""A protocol v1 producer with nothing but pyzmq and the standard library.

Sends many similarity requests in flight on one DEALER socket and matches the replies
by request_id. Usage: python raw_producer.py [ENDPOINT] [N]
"""

import json
import sys

import zmq

endpoint = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5555"
count = int(sys.argv[2]) if len(sys.argv) > 2 else 100

ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(endpoint)

pairs = [["今天天气真好", "今日阳光明媚"], ["我想订一张去北京的机票", "股票市场今天大跌"]]
for i in range(count):
    body = json.dumps({"pairs": pairs, "timeout_ms": 10_000}).encode()
    # [protocol tag, request_id, op, version ("" = whatever the pool routes to), body]
    sock.send_multipart([b"ZP1", b"req-%d" % i, b"similarity", b"", body])

pending = {b"req-%d" % i for i in range(count)}
errors = 0
while pending:
    if not sock.poll(30_000):
        sys.exit(f"no reply for 30 s; {len(pending)} requests unanswered")
    tag, request_id, status, body = sock.recv_multipart()
    assert tag == b"ZP1"
    pending.remove(request_id)
    reply = json.loads(body)
    if status == b"ok":
        scores = reply["scores"]  # one score per pair, in order
        print(request_id.decode(), reply["version"], " ".join(f"{s:.4f}" for s in scores))
    else:
        errors += 1
        print(request_id.decode(), "error", reply["code"], reply["message"])

sock.close()
ctx.term()
sys.exit(1 if errors else 0)
