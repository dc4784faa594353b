"""Exceptions raised on purpose by the :mod:`privacy` library.

They extend :mod:`fedmpt.errors` so that the ``fedmpt`` command line turns any of them into a one-line message
and a non-zero exit code. Every message names the offending parameter, file, node or value.
"""

from __future__ import annotations

from fedmpt.errors import ConfigError, FedMPTError


class PrivacyError(FedMPTError):
    """Base class of every error raised by :mod:`privacy` on purpose."""


class PrivacyParameterError(PrivacyError, ConfigError):
    """A privacy parameter (epsilon, delta, sample rate, noise multiplier, steps, ...) is out of its range."""


class AccountingError(PrivacyError):
    """An accountant could not compute epsilon for a valid history (e.g. PRV numerical failure)."""


class LedgerError(PrivacyError):
    """A ledger file cannot be read, is corrupt, or an append would break its chain (message says where)."""


class IdentityError(PrivacyError):
    """A node key file or key roster is missing, malformed, unsafe, or would be overwritten."""


class BudgetExhausted(PrivacyError):
    """A release would take a node's cumulative epsilon past its budget; raised before anything is released.

    Attributes:
        node_id: the node whose budget is exhausted.
        current_epsilon: cumulative epsilon of the node's recorded history.
        requested_epsilon: cumulative epsilon the refused release would have reached.
        max_epsilon: the budget.
        accountant: the accountant the budget is enforced with (``"rdp"`` or ``"pld"``).
    """

    def __init__(
        self,
        *,
        node_id: str,
        current_epsilon: float,
        requested_epsilon: float,
        max_epsilon: float,
        accountant: str,
    ) -> None:
        self.node_id = node_id
        self.current_epsilon = current_epsilon
        self.requested_epsilon = requested_epsilon
        self.max_epsilon = max_epsilon
        self.accountant = accountant
        super().__init__(
            f"privacy budget exhausted for node {node_id!r}: epsilon ({accountant}) is {current_epsilon:.6g} "
            f"and this release would bring it to {requested_epsilon:.6g} > max_epsilon={max_epsilon:.6g}"
        )


class DPIncompatibleError(PrivacyError, ConfigError):
    """A model configuration whose per-sample gradients cannot be guaranteed exact (message says which part)."""
