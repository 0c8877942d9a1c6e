"""XSUB/XPUB forwarder on 127.0.0.1 for Dynamo's ZMQ event plane in broker mode.

    python benches/_zmq_broker.py XSUB_PORT XPUB_PORT

In broker mode Dynamo's publishers and subscribers only connect (nothing binds 0.0.0.0).
Runs with the Dynamo venv's python (needs pyzmq); stops on SIGTERM.
"""

import sys

import zmq


def main() -> None:
    xsub_port, xpub_port = int(sys.argv[1]), int(sys.argv[2])
    ctx = zmq.Context()
    xsub = ctx.socket(zmq.XSUB)
    xsub.bind(f"tcp://127.0.0.1:{xsub_port}")
    xpub = ctx.socket(zmq.XPUB)
    xpub.bind(f"tcp://127.0.0.1:{xpub_port}")
    print("broker ready", flush=True)
    zmq.proxy(xsub, xpub)


if __name__ == "__main__":
    main()
