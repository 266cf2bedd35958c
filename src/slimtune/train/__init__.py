"""The training loop, distributed launch and the fine-tuning recipe."""
