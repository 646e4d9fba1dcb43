"""A trainer that misbehaves on purpose, for the site agent's tests
(``tests/it/trainers.rs``): ``python misbehaving.py BEHAVIOUR [ARG...]``.

Each behaviour breaks one rule the agent must enforce; ``ok`` trains nothing and
returns the model unchanged.
"""

import os
import socket
import sys
import time

import numpy as np

import medfl_trainer as mt
from medfl_trainer import protocol
from medfl_trainer import trainer_pb2 as pb

BEHAVIOUR = sys.argv[1] if len(sys.argv) > 1 else "ok"
ARGS = sys.argv[2:]


def unchanged(task):
    # The received arrays themselves: nothing copied (the protocol benchmark uses this).
    return mt.Update(params=dict(task.model), examples=10)


def train(task: mt.Task) -> mt.Update:
    if BEHAVIOUR == "ok":
        return unchanged(task)
    if BEHAVIOUR == "nan":
        update = unchanged(task)
        next(iter(update.params.values())).reshape(-1)[0] = np.nan
        return update
    if BEHAVIOUR == "wrong_name":
        update = unchanged(task)
        name = next(iter(update.params))
        update.params["renamed"] = update.params.pop(name)
        task.layout = [("renamed" if n == name else n, s) for n, s in task.layout]
        return update
    if BEHAVIOUR == "wrong_shape":
        name, shape = task.layout[0]
        task.layout[0] = (name, (int(np.prod(shape)) + 1,))
        update = unchanged(task)
        update.params[name] = np.zeros(int(np.prod(shape)) + 1, dtype=np.float32)
        return update
    if BEHAVIOUR == "huge":
        # A delta of norm 1000 (before the agent's clip).
        update = unchanged(task)
        flat = np.concatenate([a.reshape(-1) for a in update.params.values()])
        step = 1000.0 / np.sqrt(flat.size)
        update.params = {k: v + np.float32(step) for k, v in update.params.items()}
        return update
    if BEHAVIOUR == "exit":
        os._exit(3)
    if BEHAVIOUR == "sleep":
        time.sleep(3600)
    if BEHAVIOUR == "slow_but_listening":
        # Works past its timeout while reporting progress; stops when cancelled and
        # leaves a mark in its working directory.
        try:
            while True:
                task.progress()
                time.sleep(0.05)
        except mt.TrainerError:
            with open(os.path.join(os.environ["MEDFL_WORKDIR"], "cancelled"), "w") as f:
                f.write("stopped on the agent's Cancel\n")
            raise
    if BEHAVIOUR == "stderr_flood":
        # About 64 MiB to standard error, then a proper answer.
        line = ("x" * 1023 + "\n").encode()
        for _ in range(64 * 1024):
            sys.stderr.buffer.write(line)
        sys.stderr.flush()
        return unchanged(task)
    if BEHAVIOUR == "network":
        # ARGS: the host's loopback port. Report whether a connection got through.
        try:
            with socket.create_connection(("127.0.0.1", int(ARGS[0])), timeout=3) as s:
                s.sendall(b"escaped")
            raise mt.TrainerError("net_reached", "connected")
        except OSError as e:
            raise mt.TrainerError("net_blocked", repr(e))
    if BEHAVIOUR == "read":
        # ARGS: paths the trainer must not read. Report which reads succeeded.
        leaked = []
        for path in ARGS:
            try:
                with open(path, "rb") as f:
                    f.read(1)
                leaked.append(path)
            except OSError:
                pass
            try:
                # A directory covered over lists as empty: nothing of it is visible.
                if os.listdir(path):
                    leaked.append(path)
            except OSError:
                pass
        if leaked:
            print(f"read {leaked}", file=sys.stderr)
            raise mt.TrainerError("read_leaked", repr(leaked))
        raise mt.TrainerError("reads_refused", "every read failed")
    raise mt.TrainerError("unknown_behaviour", BEHAVIOUR)


def header(task, dtype="f32"):
    """A result header for the task's layout, with ``dtype``."""
    result = pb.Result(examples=1)
    for name, shape in task.layout:
        result.tensors.add(name=name, dtype=dtype, shape=list(shape))
    return result


def raw_main():
    """Behaviours that break the protocol itself, below the helper."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    task = protocol.receive(inp)
    if BEHAVIOUR == "stdout_garbage":
        while True:
            out.write(b"\xff" * 65536)
    if BEHAVIOUR == "crash_mid_stream":
        protocol._write(out, pb.TrainerFrame(result=header(task)))
        protocol._write(out, pb.TrainerFrame(chunk=pb.Chunk(tensor=0, offset=0, data=b"\0\0\0\0")))
        out.flush()
        os._exit(9)
    if BEHAVIOUR == "wrong_dtype":
        # The right names and shapes, declared as float64, with float64 bytes.
        protocol._write(out, pb.TrainerFrame(result=header(task, "f64")))
        for index, (name, _) in enumerate(task.layout):
            data = np.ascontiguousarray(task.model[name], dtype="<f8").tobytes()
            protocol._write(out, pb.TrainerFrame(chunk=pb.Chunk(tensor=index, offset=0, data=data)))
        protocol._write(out, pb.TrainerFrame(end=pb.End()))
        out.flush()
        return
    if BEHAVIOUR == "extra_bytes":
        # The right header and every value, then four bytes more before End.
        protocol._write(out, pb.TrainerFrame(result=header(task)))
        for index, (name, _) in enumerate(task.layout):
            data = np.ascontiguousarray(task.model[name], dtype="<f4").tobytes()
            protocol._write(out, pb.TrainerFrame(chunk=pb.Chunk(tensor=index, offset=0, data=data)))
        last = len(task.layout) - 1
        size = int(np.prod(task.layout[last][1]))
        protocol._write(out, pb.TrainerFrame(chunk=pb.Chunk(tensor=last, offset=size, data=b"\0\0\0\0")))
        protocol._write(out, pb.TrainerFrame(end=pb.End()))
        out.flush()
        return
    raise SystemExit(f"unknown raw behaviour {BEHAVIOUR}")


if __name__ == "__main__":
    if BEHAVIOUR in ("stdout_garbage", "crash_mid_stream", "extra_bytes", "wrong_dtype"):
        raw_main()
    else:
        mt.serve(train)
