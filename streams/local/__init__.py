"""The embedded infrastructure: Kafka (KRaft, from Maven Central) and Debian's redis-server on
loopback, and which endpoints to use (the given ones, or the local stack's)."""
