"""The device SDK needs only the base install: a device program publishes a raw frame, a JPEG frame and an
audio chunk to the real broker with every runtime package made unimportable, and a worker's decoder reads them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from consumers.kafka import make_consumer
from schemas.codec import Codec
from schemas.records import AudioChunk, FrameChunk
from streams.settings import SluiceSettings

REPO = Path(__file__).resolve().parents[2]
# What `pip install 'sluice[runtime]'` adds: none of it may be needed to publish.
RUNTIME = ("faust", "clickhouse_connect", "redis", "prometheus_client", "onnxruntime", "PIL", "scipy",
           "pydantic_settings", "rich", "torch", "chdb", "mode")  # fmt: skip

DEVICE_PROGRAM = """
import asyncio, importlib.abc, json, sys

class RuntimeNotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} belongs to sluice[runtime], not to the SDK")

sys.meta_path.insert(0, RuntimeNotInstalled())

import numpy as np
from producers.sdk import DeviceClient

async def main():
    frame = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    async with DeviceClient({bootstrap!r}, frames_topic={frames!r}, audio_topic={audio!r}) as client:
        raw = await client.publish_frame("cam-sdk", frame, wait=True)
        jpeg = await client.publish_frame("cam-sdk", frame, encoding="jpeg", wait=True)
        audio = await client.publish_audio("mic-sdk", np.zeros(4000, dtype=np.int16), 16000, wait=True)
    loaded = sorted(m for m in {blocked!r} if m in sys.modules)
    print(json.dumps({{"offsets": [raw.offset, jpeg.offset, audio.offset], "runtime_loaded": loaded}}))

asyncio.run(main())
"""


def test_the_base_install_is_the_sdk() -> None:
    base = {dep.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip()
            for dep in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}  # fmt: skip
    assert base == {"aiokafka", "fastavro", "numpy", "simplejpeg", "pydantic"}


async def test_a_device_program_publishes_without_the_runtime(settings: SluiceSettings) -> None:
    topics = settings.kafka.topics
    program = DEVICE_PROGRAM.format(blocked=RUNTIME, bootstrap=settings.kafka.bootstrap_servers,
                                    frames=topics.frames, audio=topics.audio)  # fmt: skip
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120,
                         cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)})  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["runtime_loaded"] == []

    consumer = make_consumer(settings.kafka, None, role="sdk-check")
    await consumer.start()
    try:
        consumer.subscribe([topics.frames, topics.audio])
        found = []
        while len(found) < 3:
            batches = await consumer.getmany(timeout_ms=5000)
            assert batches, "the SDK's records did not arrive"
            found += [m for messages in batches.values() for m in messages]
    finally:
        await consumer.stop()
    codec = Codec()
    frames = [codec.read(m.value, FrameChunk) for m in found if m.topic == topics.frames]
    (audio,) = [codec.read(m.value, AudioChunk) for m in found if m.topic == topics.audio]
    assert sorted(f.encoding for f in frames) == ["JPEG", "RAW"] and {f.device_id for f in frames} == {"cam-sdk"}
    assert audio.sample_rate == 16000 and audio.device_id == "mic-sdk"
