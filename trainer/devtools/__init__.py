"""Developer tools: synthetic models and datasets for tests and benchmarks (never used by training)."""
