"""Sub-commands of the ``fedmpt`` CLI; each module exposes ``register(subparsers)``."""
