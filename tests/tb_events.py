"""Read scalar tags back from TensorBoard event files (TFRecord framing, no TF needed)."""

import glob
import os
import struct

from tensorboardX.proto import event_pb2


def scalar_tags(logdir: str) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {}
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        data = open(path, "rb").read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                values.setdefault(v.tag, []).append(v.simple_value)
    return values
