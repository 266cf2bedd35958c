"""HTTP serving: classifiers with dynamic batching, causal LMs with continuous batching and an OpenAI-compatible API."""
