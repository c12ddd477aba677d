"""Kafka through confluent-kafka: admin (topics and their configs), producers, consumers."""
