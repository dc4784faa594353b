"""Flower apps of fedmpt: thin ServerApp/ClientApp adapters over the library (the only code using ``flwr``).

``fedmpt.apps.server_app:app`` and ``fedmpt.apps.client_app:app`` are the components named in
``pyproject.toml`` (``[tool.flwr.app.components]``); :mod:`fedmpt.apps.config` reads the run config,
:mod:`fedmpt.apps.task` is the interface to the learning code.
"""
