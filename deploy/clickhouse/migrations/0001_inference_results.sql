-- One row per input message that produced a result.
--
-- Deduplication: Kafka delivers at-least-once, so a result can reach the sink
-- twice (a worker redid an input after a crash, or the sink re-read a batch it
-- had inserted but not yet committed). Two mechanisms, both checked on the
-- embedded engine by tests/consumers/test_clickhouse.py:
--   1. ReplacingMergeTree over a sorting key that ends in the input's Kafka
--      coordinates (source topic, partition, offset): rows of the same input
--      collapse on merge, and `FINAL` (or the view below) collapses them at query
--      time. The leading (device_id, capture_time) are functions of the input, so
--      duplicates share the whole key, and device/time queries stay local.
--   2. insert_deduplication_token on each insert (the sink derives it from the
--      batch's offset ranges): an identical retry of a batch whose first attempt
--      did land is dropped at insert time. Needs the deduplication window below,
--      since the table is not replicated.
CREATE TABLE IF NOT EXISTS ${database}.inference_results
(
    source_topic      LowCardinality(String),
    source_partition  UInt32,
    source_offset     UInt64,
    trace_id          String,
    device_id         LowCardinality(String),
    modality          Enum8('FRAME' = 1, 'AUDIO' = 2),
    seq               UInt64,
    capture_time      DateTime64(6, 'UTC'),
    result_time       DateTime64(6, 'UTC'),
    model_name        LowCardinality(String),
    model_version     UInt32,
    label             LowCardinality(String) COMMENT 'top-1 label',
    score             Float32 COMMENT 'top-1 score',
    top_labels        Array(LowCardinality(String)),
    top_scores        Array(Float32),
    ground_truth      Nullable(String),
    queue_ms          Float32,
    batch_wait_ms     Float32,
    decode_ms         Float32,
    inference_ms      Float32,
    batch_size        UInt16,
    worker_id         LowCardinality(String),
    inserted_at       DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(result_time)
PARTITION BY toYYYYMMDD(capture_time)
ORDER BY (device_id, capture_time, source_topic, source_partition, source_offset)
SETTINGS non_replicated_deduplication_window = 10000;

-- What analysts query: one row per input, duplicates collapsed at read time.
CREATE VIEW IF NOT EXISTS ${database}.inference_results_dedup AS
SELECT * FROM ${database}.inference_results FINAL;
