"""Generates the Python stubs and Envoy's descriptor set from proto/ into gen/ (`make gen`).

google/api and google/rpc come from googleapis-common-protos, google/protobuf from grpcio-tools, so
the descriptor set (with --include_imports) holds every type Envoy needs, the rich error details too.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto"
GEN = ROOT / "gen"
DESCRIPTOR = GEN / "descriptor.pb"


def include_dirs() -> list[str]:
    from google.api import annotations_pb2  # googleapis-common-protos ships the .proto files beside its modules

    googleapis = Path(annotations_pb2.__file__).resolve().parents[2]
    well_known = Path(str(resources.files("grpc_tools") / "_proto"))
    return [str(PROTO), str(googleapis), str(well_known)]


def main() -> int:
    GEN.mkdir(exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO)) for p in PROTO.rglob("*.proto"))
    includes = [f"-I{d}" for d in include_dirs()]
    stubs = ["grpc_tools.protoc", *includes, f"--python_out={GEN}", f"--pyi_out={GEN}", f"--grpc_python_out={GEN}", *protos]
    if protoc.main(stubs) != 0:
        return 1
    # The error details are not imported by our protos but Envoy needs them to print rich statuses.
    extra = ["google/rpc/error_details.proto", "google/rpc/status.proto"]
    descriptor = ["grpc_tools.protoc", *includes, "--include_imports", f"--descriptor_set_out={DESCRIPTOR}", *protos, *extra]
    if protoc.main(descriptor) != 0:
        return 1
    print(f"generated stubs for {len(protos)} proto files and {DESCRIPTOR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
