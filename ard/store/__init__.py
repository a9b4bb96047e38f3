"""The trajectory store: format (manifest, shards, verify, reader), the prediction writer, the job list of
a precompute, and the `ard-store` command. docs/store.md describes the format."""
