"""Calls CSI methods on a unix-socket endpoint with grpcio (gRPC C-core).

Usage: csi_calls.py SOCKET [--authority AUTHORITY] METHOD...

Every METHOD (e.g. /csi.v1.Identity/Probe) is called once, in order, on one
channel, with an empty request (an empty protobuf message is zero bytes), so
no generated stubs are needed. The channel has grpcio's DEFAULT options
unless --authority sets grpc.default_authority. One JSON object per call is
printed: {"method", "code", "response" (hex, when OK), "details"}.
"""

import argparse
import json
import sys

import grpc


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("socket")
    parser.add_argument("--authority")
    parser.add_argument("methods", nargs="+")
    args = parser.parse_args()

    options = []
    if args.authority is not None:
        options.append(("grpc.default_authority", args.authority))
    with grpc.insecure_channel("unix://" + args.socket, options=options) as channel:
        for method in args.methods:
            call = channel.unary_unary(
                method,
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            try:
                response = call(b"", timeout=60)
                result = {"method": method, "code": "OK", "response": response.hex()}
            except grpc.RpcError as e:
                result = {"method": method, "code": e.code().name, "details": e.details()}
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
