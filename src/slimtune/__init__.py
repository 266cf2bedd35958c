"""slimtune: make a pretrained transformer task-tuned, small and fast, and prove what each step
cost and gained (size on disk, latency, accuracy).

Importing the package is lean: no torch, transformers or PEFT until a function needs them.
"""

__version__ = "0.1.0"
