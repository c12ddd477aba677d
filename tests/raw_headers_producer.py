"""Produce records whose header keys are raw bytes (not UTF-8), as a hostile producer can:
`raw_headers_producer.py BOOTSTRAP TOPIC` reads JSON lines {"key", "value", "header_key_hex"}
from stdin, through aiokafka's pure-Python record builder (`RawKey`)."""
import asyncio
import json
import os
import sys

os.environ["AIOKAFKA_NO_EXTENSIONS"] = "1"  # before aiokafka is imported

from aiokafka import AIOKafkaProducer  # noqa: E402
from raw_header_key import RawKey  # noqa: E402


async def main(bootstrap: str, topic: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for line in sys.stdin:
            rec = json.loads(line)
            headers = [(RawKey(bytes.fromhex(rec["header_key_hex"])), b"v")]
            await (await producer.send(topic, rec["value"].encode(), key=rec["key"].encode(),
                                       headers=headers))
    finally:
        await producer.stop()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:3]))
