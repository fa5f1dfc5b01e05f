"""The bus contract: Avro schemas, the wire codec, typed records, topics and modalities, and SluiceError."""
