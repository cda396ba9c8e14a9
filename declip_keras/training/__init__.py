"""Training runs: `train`, its `TrainConfig`, callbacks, the optimiser and its
schedule, run folders and atomic file writes."""
