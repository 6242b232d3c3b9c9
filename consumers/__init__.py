"""Kafka consumer loop, inbox writes, dead-letter topic, publisher."""
