"""Reading the inputs: finding files (`io.find_inputs`), decoding images and audio, and the streaming
training datasets that read random crops and segments from disk in worker processes (`streams`)."""
