"""A header key whose bytes on the wire are chosen freely, as a hostile producer's can be."""


class RawKey(str):
    """aiokafka's pure-Python record builder encodes a header key with `.encode()`: this one
    answers with `raw`, whatever its encoding (the broker does not check it)."""

    def __new__(cls, raw: bytes):
        key = super().__new__(cls, "k")
        key.raw = raw
        return key

    def encode(self, *args, **kwargs):
        return self.raw
