"""FedMPT model components (condition prompts, adapters, condition-guided optimal transport, gate, loss).

Each mechanism lives in its own module named after it (``adapters``, ``sinkhorn``, ``gate``,
``asymmetric_loss``, ...); every computation is per sample (no batch statistics), so per-sample gradients for
DP-SGD are exact.
"""
