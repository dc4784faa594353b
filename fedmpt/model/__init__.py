"""FedMPT model components: condition adapters, condition-guided optimal transport, gate and loss.

Each mechanism lives in its own module (``adapters``, ``sinkhorn``, ``gate``, ``asymmetric_loss``); every
computation is per sample (no batch statistics) so that per-sample gradients for DP-SGD are exact.
"""
