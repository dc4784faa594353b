"""Differential privacy for fedmpt: DP-SGD, privacy accounting, the signed epsilon ledger and audits.

Library code: never imports ``flwr``.
"""
