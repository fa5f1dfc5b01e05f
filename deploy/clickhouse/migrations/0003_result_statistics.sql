-- Version 2 of the result record (schemas/inference_result_v2.avsc): what drift detection and analysts read.
-- Rows of version 1 results keep the defaults (empty map and arrays, NULL entropy).
--   input_stats         statistics of the model input by name (frames: brightness, contrast, colourfulness,
--                       sharpness; audio: rms_dbfs, zero_crossing_rate, spectral_centroid_hz, clipping_ratio)
--   probabilities       the model's whole output, in its labels' order (config.json)
--   prediction_entropy  entropy of the probabilities, nats
--   embedding           the model's embedding of the input, where it exposes one
ALTER TABLE ${database}.inference_results
    ADD COLUMN IF NOT EXISTS input_stats Map(LowCardinality(String), Float32) AFTER worker_id,
    ADD COLUMN IF NOT EXISTS probabilities Array(Float32) AFTER input_stats,
    ADD COLUMN IF NOT EXISTS prediction_entropy Nullable(Float32) AFTER probabilities,
    ADD COLUMN IF NOT EXISTS embedding Array(Float32) AFTER prediction_entropy;

ALTER TABLE ${database}.shadow_results
    ADD COLUMN IF NOT EXISTS input_stats Map(LowCardinality(String), Float32) AFTER worker_id,
    ADD COLUMN IF NOT EXISTS probabilities Array(Float32) AFTER input_stats,
    ADD COLUMN IF NOT EXISTS prediction_entropy Nullable(Float32) AFTER probabilities,
    ADD COLUMN IF NOT EXISTS embedding Array(Float32) AFTER prediction_entropy;

-- The dedup views were created with the columns of their day (SELECT * is expanded when a view is made):
-- recreate them so that they show the new columns.
DROP VIEW IF EXISTS ${database}.inference_results_dedup;
CREATE VIEW ${database}.inference_results_dedup AS SELECT * FROM ${database}.inference_results FINAL;
DROP VIEW IF EXISTS ${database}.shadow_results_dedup;
CREATE VIEW ${database}.shadow_results_dedup AS SELECT * FROM ${database}.shadow_results FINAL;
