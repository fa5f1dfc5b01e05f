-- What dashboards and analysts read without scanning every result: per-minute aggregates, filled by
-- materialized views as the sink inserts, and the drift detector's verdicts.
--
-- The views see each inserted row once. A result redelivered after a crash (at-least-once) and inserted again
-- in a differently cut batch is counted twice here, where the dedup view counts it once: use the aggregates
-- for trends and dashboards, inference_results_dedup for exact counts. Identical retries of a batch are
-- dropped before the views see them (insert_deduplication_token).

-- Per minute, device, model and version: volume, label mix, score and latency quantiles.
CREATE TABLE IF NOT EXISTS ${database}.results_per_minute
(
    minute                  DateTime('UTC'),
    device_id               LowCardinality(String),
    modality                Enum8('FRAME' = 1, 'AUDIO' = 2),
    model_name              LowCardinality(String),
    model_version           UInt32,
    results                 SimpleAggregateFunction(sum, UInt64),
    label_counts            SimpleAggregateFunction(sumMap, Map(String, UInt64)) COMMENT 'top-1 label -> results',
    score_quantiles         AggregateFunction(quantiles(0.5, 0.9, 0.99), Float32) COMMENT 'top-1 score',
    e2e_ms_quantiles        AggregateFunction(quantiles(0.5, 0.9, 0.99), Float64) COMMENT 'capture to result',
    inference_ms_quantiles  AggregateFunction(quantiles(0.5, 0.9, 0.99), Float32) COMMENT 'engine time per batch',
    entropy_quantiles       AggregateFunction(quantiles(0.5, 0.9, 0.99), Float32) COMMENT 'prediction entropy, nats'
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (device_id, model_name, model_version, modality, minute);

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.results_per_minute_mv TO ${database}.results_per_minute AS
SELECT
    toStartOfMinute(capture_time) AS minute, device_id, modality, model_name, model_version,
    count() AS results,
    sumMap(map(label, toUInt64(1))) AS label_counts,
    quantilesState(0.5, 0.9, 0.99)(score) AS score_quantiles,
    quantilesState(0.5, 0.9, 0.99)(
        (toUnixTimestamp64Micro(result_time) - toUnixTimestamp64Micro(capture_time)) / 1000.
    ) AS e2e_ms_quantiles,
    quantilesState(0.5, 0.9, 0.99)(inference_ms) AS inference_ms_quantiles,
    quantilesState(0.5, 0.9, 0.99)(assumeNotNull(prediction_entropy)) AS entropy_quantiles
FROM ${database}.inference_results
GROUP BY minute, device_id, modality, model_name, model_version;

-- Per minute, device, model, version and input statistic (long format: a new statistic needs no migration).
CREATE TABLE IF NOT EXISTS ${database}.input_stats_per_minute
(
    minute         DateTime('UTC'),
    device_id      LowCardinality(String),
    modality       Enum8('FRAME' = 1, 'AUDIO' = 2),
    model_name     LowCardinality(String),
    model_version  UInt32,
    statistic      LowCardinality(String),
    mean           AggregateFunction(avg, Float32),
    quantiles      AggregateFunction(quantiles(0.05, 0.5, 0.95), Float32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (device_id, statistic, model_name, model_version, modality, minute);

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.input_stats_per_minute_mv TO ${database}.input_stats_per_minute AS
SELECT
    toStartOfMinute(capture_time) AS minute, device_id, modality, model_name, model_version, statistic,
    avgState(value) AS mean,
    quantilesState(0.05, 0.5, 0.95)(value) AS quantiles
FROM ${database}.inference_results
ARRAY JOIN mapKeys(input_stats) AS statistic, mapValues(input_stats) AS value
GROUP BY minute, device_id, modality, model_name, model_version, statistic;

-- One row per test per evaluated window of the drift detector (streams/apps/drift.py), flagged or not, so a
-- dashboard can draw a score against its threshold over time.
CREATE TABLE IF NOT EXISTS ${database}.drift_events
(
    window_start    DateTime64(3, 'UTC'),
    window_end      DateTime64(3, 'UTC'),
    device_group    LowCardinality(String),
    modality        Enum8('FRAME' = 1, 'AUDIO' = 2),
    model_name      LowCardinality(String),
    model_version   UInt32,
    statistic       LowCardinality(String) COMMENT 'what was compared: an input statistic, a class probability, the label mix',
    test            LowCardinality(String) COMMENT 'ks, cvm, psi, cosine, ...',
    score           Float64,
    threshold       Float64,
    p_value         Nullable(Float64),
    drifted         Bool,
    reference_size  UInt32,
    current_size    UInt32,
    detected_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(detected_at)
PARTITION BY toYYYYMM(window_end)
ORDER BY (model_name, model_version, device_group, window_end, statistic, test);
