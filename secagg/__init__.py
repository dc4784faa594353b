"""Secure aggregation for fedmpt: pairwise masking (Bonawitz et al. 2017, SecAgg+ graph) and CKKS (TenSEAL).

Library code: never imports ``flwr``.
"""
