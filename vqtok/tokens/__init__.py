"""Token storage: `.vqt` files (`tokfile`), their range coder (`rangecoder`) and memory-mappable shards (`shards`)."""
