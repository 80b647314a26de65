"""Speed and memory benchmarks of converted models against their teachers (`linearize bench`)."""
