"""The training engine: Accelerate + DeepSpeed setup, optimizer and schedule, metrics, the loop."""
