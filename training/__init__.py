"""Fine-tuning data and training: `ragtune prepare`, `ragtune train`, `ragtune estimate-memory`.

Library modules import torch/transformers lazily so the CLI stays fast to start.
"""
