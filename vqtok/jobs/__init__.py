"""What the commands run over folders: encode and decode (`pipeline`, `audiostream` for long audio), and the
inspect / eval reports (`report`)."""
