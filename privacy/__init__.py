"""Differential privacy for fedmpt: DP-SGD, privacy accounting, the signed epsilon ledger and audits.

Modules: ``accounting`` (DP-SGD events, epsilon under RDP / PLD / PRV, noise calibration), ``ledger`` (the
signed, hash-chained epsilon ledger, node keys, verification), ``budget`` (per-node budgets and the
check -> train -> record -> send order), ``audit`` (empirical epsilon lower bounds), ``errors``.
See ``docs/privacy.md``.

Library code: never imports ``flwr``.
"""
