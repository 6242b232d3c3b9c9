"""Model server (Open Inference Protocol v2), champion/canary traffic split, dynamic batching."""
