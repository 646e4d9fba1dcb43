"""The trainer's side of ``medfl.trainer.v1`` (see ``proto/medfl/trainer/v1/trainer.proto``).

Frames are varint-length-prefixed protobuf messages: ``AgentFrame`` on standard input,
``TrainerFrame`` on standard output. Tensors travel as little-endian f32 bytes in chunks
of at most 2^18 values, written into and read from whole numpy arrays without holding a
second copy of the model.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
import threading
import traceback
from typing import BinaryIO, Callable, Dict, List, Optional, Tuple

import numpy as np

from medfl_trainer import trainer_pb2 as pb

CHUNK_VALUES = 1 << 18
MAX_FRAME = 8 << 20


class TrainerError(Exception):
    """Refuses the round. ``kind`` (lower-case letters, digits, ``_``) is all that
    leaves the site; ``reason`` goes to the site's log."""

    def __init__(self, kind: str, reason: str = ""):
        super().__init__(reason or kind)
        self.kind = kind
        self.reason = reason or kind


@dataclasses.dataclass
class Privacy:
    unit: str  # "none", "site" or "record"
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    steps: int = 0
    clip_norm: float = 0.0


@dataclasses.dataclass
class Task:
    """One round's work, as the site agent hands it over."""

    study_id: str
    round: int
    trainer: str
    dataset: str
    dataset_path: str
    label: str
    features: List[str]
    center: Optional[np.ndarray]
    scale: Optional[np.ndarray]
    local_epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    seed: int
    privacy: Privacy
    layout: List[Tuple[str, Tuple[int, ...]]]
    model: Dict[str, np.ndarray]
    _out: Optional[BinaryIO] = dataclasses.field(default=None, repr=False)
    _cancel: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)

    @property
    def cancelled(self) -> bool:
        """Whether the agent asked the trainer to stop (it overran its timeout, or the
        agent went away). Check it in long loops; ``progress`` does."""
        return self._cancel.is_set()

    def progress(self, fraction: float = -1.0) -> None:
        """Tells the agent the trainer is alive (and how far, 0..1, if known). Raises
        ``TrainerError("cancelled")`` once the agent has asked the trainer to stop."""
        if self._cancel.is_set():
            raise TrainerError("cancelled", "the agent cancelled the task")
        if self._out is not None:
            _write(self._out, pb.TrainerFrame(progress=pb.Progress(fraction=float(fraction))))
            self._out.flush()


@dataclasses.dataclass
class Update:
    """What a trainer returns: the new model (or, with ``delta=True``, the change to
    it) by tensor name, the rows trained on and optional numeric metrics."""

    params: Dict[str, np.ndarray]
    examples: int = 0
    metrics: Dict[str, float] = dataclasses.field(default_factory=dict)
    delta: bool = False
    #: Under record-level DP: the effective noise multiplier applied (``DpSgd``'s).
    noise_multiplier: float = 0.0


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    parts = []
    while n > 0:
        part = stream.read(n)
        if not part:
            raise EOFError("the agent closed the stream")
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _read_varint(stream: BinaryIO) -> int:
    value, shift = 0, 0
    while True:
        byte = _read_exact(stream, 1)[0]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 64 bits")


def _readinto_exact(stream: BinaryIO, view: memoryview) -> None:
    while len(view):
        n = stream.readinto(view)
        if not n:
            raise EOFError("the agent closed the stream")
        view = view[n:]


def _read(stream: BinaryIO) -> pb.AgentFrame:
    length = _read_varint(stream)
    if length > MAX_FRAME:
        raise ValueError(f"a frame of {length} bytes")
    frame = pb.AgentFrame()
    frame.ParseFromString(_read_exact(stream, length))
    return frame


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _write(stream: BinaryIO, frame: pb.TrainerFrame) -> None:
    body = frame.SerializeToString()
    stream.write(_varint(len(body)))
    stream.write(body)


def receive(stream: BinaryIO) -> Task:
    """Reads a task and its model (the frames up to End)."""
    first = _read(stream)
    if first.WhichOneof("body") != "task":
        raise ValueError(f"expected a task, got {first.WhichOneof('body')}")
    t = first.task
    layout = []
    flat = []
    for spec in t.tensors:
        if spec.dtype != "f32":
            raise TrainerError("layout", f"tensor {spec.name} has dtype {spec.dtype}; this package handles f32")
        shape = tuple(int(d) for d in spec.shape)
        layout.append((spec.name, shape))
        flat.append(np.empty(int(np.prod(shape)), dtype="<f4"))
    targets = [memoryview(arr).cast("B") for arr in flat]
    while True:
        length = _read_varint(stream)
        if length > MAX_FRAME:
            raise ValueError(f"a frame of {length} bytes")
        key = _read_exact(stream, 1)[0]
        if key == 0x12:  # AgentFrame.chunk (field 2, length-delimited): read in place
            _read_chunk(stream, targets)
            continue
        frame = pb.AgentFrame.FromString(bytes([key]) + _read_exact(stream, length - 1))
        kind = frame.WhichOneof("body")
        if kind == "end":
            break
        if kind == "cancel":
            raise TrainerError("cancelled", "the agent cancelled the task")
        raise ValueError(f"unexpected {kind} while reading the model")
    p = t.privacy
    return Task(
        study_id=t.study_id,
        round=t.round,
        trainer=t.trainer,
        dataset=t.dataset,
        dataset_path=t.dataset_path,
        label=t.label,
        features=list(t.features),
        center=np.array(t.center, dtype=np.float64) if len(t.center) else None,
        scale=np.array(t.scale, dtype=np.float64) if len(t.scale) else None,
        local_epochs=t.local_epochs,
        batch_size=t.batch_size,
        learning_rate=t.learning_rate,
        optimizer=t.optimizer,
        seed=t.seed,
        privacy=Privacy(p.unit, p.noise_multiplier, p.sample_rate, p.steps, p.clip_norm),
        layout=layout,
        model={name: arr.reshape(shape) for (name, shape), arr in zip(layout, flat)},
    )


def _read_chunk(stream: BinaryIO, targets: List[memoryview]) -> None:
    """Reads one ``Chunk`` message (its length first) straight into the model's arrays:
    the values go from the pipe into place with no intermediate copy."""
    remaining = _read_varint(stream)
    tensor, offset = 0, 0
    while remaining > 0:
        key = _read_varint(stream)
        remaining -= len(_varint(key))
        if key == 0x08:
            tensor = _read_varint(stream)
            remaining -= len(_varint(tensor))
        elif key == 0x10:
            offset = _read_varint(stream)
            remaining -= len(_varint(offset))
        elif key == 0x1A:
            size = _read_varint(stream)
            remaining -= len(_varint(size)) + size
            if tensor >= len(targets) or size % 4 or (offset * 4 + size) > len(targets[tensor]):
                raise ValueError(f"a chunk of {size} bytes at {offset} does not fit tensor {tensor}")
            _readinto_exact(stream, targets[tensor][offset * 4 : offset * 4 + size])
        else:
            raise ValueError(f"an unexpected field {key >> 3} in a chunk")


def send(stream: BinaryIO, task: Task, update: Update) -> None:
    """Writes the result header, the tensors in the task's layout order, then End."""
    missing = [name for name, _ in task.layout if name not in update.params]
    extra = sorted(set(update.params) - {name for name, _ in task.layout})
    if missing or extra:
        raise TrainerError("layout", f"missing tensors {missing}, unknown tensors {extra}")
    result = pb.Result(
        delta=update.delta, examples=int(update.examples), noise_multiplier=float(update.noise_multiplier)
    )
    for name, shape in task.layout:
        result.tensors.add(name=name, dtype="f32", shape=list(shape))
    for k, v in update.metrics.items():
        result.metrics[k] = float(v)
    _write(stream, pb.TrainerFrame(result=result))
    for index, (name, shape) in enumerate(task.layout):
        arr = np.ascontiguousarray(update.params[name], dtype="<f4").reshape(-1)
        if arr.size != int(np.prod(shape)):
            raise TrainerError("layout", f"tensor {name} has {arr.size} values, the layout {shape}")
        for at in range(0, arr.size, CHUNK_VALUES):
            _write_chunk(stream, index, at, memoryview(arr[at : at + CHUNK_VALUES]).cast("B"))
    _write(stream, pb.TrainerFrame(end=pb.End()))
    stream.flush()


def _field(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _write_chunk(stream: BinaryIO, tensor: int, offset: int, data: memoryview) -> None:
    """Writes ``TrainerFrame{chunk: Chunk{tensor, offset, data}}`` with the values
    straight from the array (the protobuf encoding, by hand, without copying them)."""
    inner = b""
    if tensor:
        inner += _field(1, 0) + _varint(tensor)
    if offset:
        inner += _field(2, 0) + _varint(offset)
    if len(data):
        inner += _field(3, 2) + _varint(len(data))
    chunk_len = len(inner) + len(data)
    head = _field(3, 2) + _varint(chunk_len)
    stream.write(_varint(len(head) + chunk_len) + head + inner)
    stream.write(data)


class _RawStdin:
    """Standard input read through its file descriptor, not ``sys.stdin.buffer``: a
    thread blocked here holds no lock of the interpreter's, so the process can end
    while it waits (the agent writes nothing after the model but a Cancel)."""

    def __init__(self, fd: int):
        self.fd = fd

    def read(self, n: int) -> bytes:
        return os.read(self.fd, n)


def _watch_for_cancel(inp: BinaryIO, cancel: threading.Event) -> None:
    """Reads the agent's frames after the model: Cancel, or the end of the stream (the
    agent is gone), sets ``cancel``."""
    try:
        while _read(inp).WhichOneof("body") != "cancel":
            pass
    except Exception:
        pass
    cancel.set()


def serve(train: Callable[[Task], Update]) -> None:
    """Runs one session: receive the task, call ``train``, send its update (or the
    error it raised), and return. Call it from your trainer's ``__main__``."""
    inp = sys.stdin.buffer
    out = sys.stdout.buffer
    # Whatever the training code prints goes to the site's log, not into the protocol.
    sys.stdout = sys.stderr
    try:
        task = receive(inp)
        task._out = out
        threading.Thread(
            target=_watch_for_cancel, args=(_RawStdin(inp.fileno()), task._cancel), daemon=True
        ).start()
        update = train(task)
        send(out, task, update)
    except TrainerError as e:
        print(f"medfl-trainer: refusing: {e.kind}: {e.reason}", file=sys.stderr)
        _write(out, pb.TrainerFrame(error=pb.Error(kind=e.kind, reason=e.reason)))
        out.flush()
    except Exception as e:  # the reason stays on the site (standard error, the site's log)
        traceback.print_exc()
        _write(out, pb.TrainerFrame(error=pb.Error(kind="training", reason=repr(e))))
        out.flush()


@dataclasses.dataclass
class LinearScale:
    """Where a linear model's weights live. With the manifest's public scaling the
    federated model is on those standardized coordinates (DP noise then lands on the
    scale of the weights); without one it is on raw values and each site standardizes
    with its own statistics, mapping the weights there and back."""

    center: np.ndarray
    scale: np.ndarray
    public: bool

    @classmethod
    def of(cls, task: "Task", x: np.ndarray) -> "LinearScale":
        if task.center is not None and task.scale is not None:
            return cls(task.center, task.scale, True)
        sd = x.std(axis=0)
        return cls(x.mean(axis=0), np.where(sd > 1e-12, sd, 1.0), False)

    def standardize(self, x: np.ndarray) -> np.ndarray:
        return (x - self.center) / self.scale

    def to_training(self, w: np.ndarray, b: float) -> Tuple[np.ndarray, float]:
        """The federated weights as weights on standardized inputs: w' = w·s, b' = b + w·c."""
        if self.public:
            return w, b
        return w * self.scale, b + float(w @ self.center)

    def to_federated(self, w: np.ndarray, b: float) -> Tuple[np.ndarray, float]:
        """The inverse: w = w'/s, b = b' − w·c."""
        if self.public:
            return w, b
        w = w / self.scale
        return w, b - float(w @ self.center)


def load_csv(task: Task) -> Tuple[np.ndarray, np.ndarray]:
    """The approved dataset's rows: the manifest's feature columns (float64, a missing
    or non-numeric cell replaced by its column's mean) and the 0/1 label."""
    with open(task.dataset_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        index = {name: i for i, name in enumerate(header)}
        absent = [c for c in task.features + [task.label] if c not in index]
        if absent:
            raise TrainerError("data", f"{task.dataset_path} lacks columns {absent}")
        cols = [index[c] for c in task.features]
        rows, labels = [], []
        for row in reader:
            if not row:
                continue
            try:
                label = float(row[index[task.label]])
            except ValueError:
                continue
            values = []
            for c in cols:
                try:
                    values.append(float(row[c]))
                except ValueError:
                    values.append(np.nan)
            rows.append(values)
            labels.append(label)
    x = np.array(rows, dtype=np.float64).reshape(len(rows), len(cols))
    if np.isnan(x).any():
        means = np.nanmean(x, axis=0)
        where = np.where(np.isnan(x))
        x[where] = np.take(np.nan_to_num(means), where[1])
    return x, np.array(labels, dtype=np.float64)
