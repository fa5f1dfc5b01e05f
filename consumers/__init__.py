"""Kafka in, batched inference and ClickHouse out: the worker, the sink, and the checkpoint they share."""
