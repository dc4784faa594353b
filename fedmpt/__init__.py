"""fedmpt: federated multi-label prompt tuning of vision-language models (FedMPT, CVPR 2026).

The packages ``fedmpt`` (model, data, training), ``privacy`` (DP-SGD, accounting, ledger, audits) and
``secagg`` (pairwise masking, CKKS) are libraries that never import ``flwr``; only
``fedmpt.apps`` holds the Flower ServerApp/ClientApp adapters.
"""

__version__ = "0.1.0"
