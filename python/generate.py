"""Regenerates medfl/v1 from ../proto with grpcio-tools (python/requirements-ci.txt).

    python python/generate.py           # rewrite the stubs
    python python/generate.py --check   # exit 1 when the committed stubs are stale
"""

import filecmp
import pathlib
import sys
import tempfile

from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent / "proto" / "proto"
PROTO = "medfl/v1/medfl.proto"
OUTPUTS = ["medfl_pb2.py", "medfl_pb2.pyi", "medfl_pb2_grpc.py"]


def generate(out: pathlib.Path) -> None:
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        PROTO,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO_ROOT / PROTO}")


def main() -> int:
    target = HERE / "medfl" / "v1"
    if "--check" not in sys.argv:
        generate(HERE)
        print(f"regenerated {', '.join(OUTPUTS)} in {target}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(pathlib.Path(tmp))
        stale = [
            name
            for name in OUTPUTS
            if not (target / name).exists()
            or not filecmp.cmp(pathlib.Path(tmp) / "medfl" / "v1" / name, target / name, shallow=False)
        ]
    if stale:
        print(f"stale: {', '.join(stale)} differ from {PROTO}; run: python python/generate.py", file=sys.stderr)
        return 1
    print(f"medfl/v1 stubs are current with {PROTO}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
