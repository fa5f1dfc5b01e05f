-- Results of a model version in shadow (`sluice models activate MODEL VERSION --shadow SHARE`): the same
-- inputs as the serving version's, kept apart so that nothing counting served results (analysts, the
-- dedup view, the demo's checks) counts them twice. Compare a shadow with what served by joining on the
-- input's coordinates (source_topic, source_partition, source_offset). Same layout and deduplication as
-- inference_results (0001).
CREATE TABLE IF NOT EXISTS ${database}.shadow_results AS ${database}.inference_results
ENGINE = ReplacingMergeTree(result_time)
PARTITION BY toYYYYMMDD(capture_time)
ORDER BY (device_id, capture_time, source_topic, source_partition, source_offset)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE VIEW IF NOT EXISTS ${database}.shadow_results_dedup AS
SELECT * FROM ${database}.shadow_results FINAL;
