"""The networks: 2-D image and 1-D audio encoder/decoder stacks, and `Tokenizer` (encoder + quantizer + decoder)."""
