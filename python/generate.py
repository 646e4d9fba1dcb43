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
# The trainer protocol's messages, for the medfl-trainer package (no gRPC there).
TRAINER_PROTO = "medfl/trainer/v1/trainer.proto"
TRAINER_TARGET = HERE / "medfl-trainer" / "medfl_trainer"
TRAINER_OUTPUTS = ["trainer_pb2.py", "trainer_pb2.pyi"]


def generate_trainer(out: pathlib.Path) -> None:
    """Writes trainer_pb2.py(i) into ``out`` (flat: the module imports nothing else)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}", TRAINER_PROTO]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {PROTO_ROOT / TRAINER_PROTO}")
        for name in TRAINER_OUTPUTS:
            (out / name).write_bytes((pathlib.Path(tmp) / "medfl" / "trainer" / "v1" / name).read_bytes())


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
        generate_trainer(TRAINER_TARGET)
        print(f"regenerated {', '.join(OUTPUTS)} in {target} and {', '.join(TRAINER_OUTPUTS)} in {TRAINER_TARGET}")
        return 0
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as tmp_trainer:
        generate(pathlib.Path(tmp))
        generate_trainer(pathlib.Path(tmp_trainer))
        stale = [
            name
            for name in OUTPUTS
            if not (target / name).exists()
            or not filecmp.cmp(pathlib.Path(tmp) / "medfl" / "v1" / name, target / name, shallow=False)
        ] + [
            name
            for name in TRAINER_OUTPUTS
            if not (TRAINER_TARGET / name).exists()
            or not filecmp.cmp(pathlib.Path(tmp_trainer) / name, TRAINER_TARGET / name, shallow=False)
        ]
    if stale:
        print(f"stale: {', '.join(stale)} differ from {PROTO}; run: python python/generate.py", file=sys.stderr)
        return 1
    print(f"the stubs are current with {PROTO} and {TRAINER_PROTO}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
