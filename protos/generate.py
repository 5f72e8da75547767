"""Regenerate the committed Python stubs from protos/*.proto (run after editing a .proto).

    python protos/generate.py [OUT_DIR]

Writes expert_node/proto/moemesh_pb2.py, moemesh_pb2.pyi and moemesh_pb2_grpc.py, with the grpc
module importing its sibling relatively so the stubs live inside the package. A test regenerates
into a temporary folder and fails when the committed files differ.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "expert_node" / "proto"


def generate(out: Path) -> None:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{HERE}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
            str(HERE / "moemesh.proto")]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    grpc_file = out / "moemesh_pb2_grpc.py"
    grpc_file.write_text(grpc_file.read_text().replace("import moemesh_pb2 as", "from . import moemesh_pb2 as"))


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
