"""Exception hierarchy of :mod:`secagg`.

Every error names the stage, the peer and the offending value. Configuration mistakes raise
:class:`fedmpt.errors.ConfigError` (a ``ValueError``); protocol-time failures raise a :class:`SecAggError`.
"""

from __future__ import annotations

from fedmpt.errors import FedMPTError


class SecAggError(FedMPTError):
    """Base class of every secure-aggregation failure raised on purpose."""


class ProtocolError(SecAggError):
    """A party was asked to do something the protocol forbids (wrong stage order, inconsistent view, ...)."""


class MessageRejected(ProtocolError):
    """A wire message is malformed, truncated, mis-sized, replayed, or bound to another run, round or
    stage."""


class SignatureInvalid(MessageRejected):
    """An advertised key bundle is not signed by the identity key the roster holds for its sender."""


class ThresholdNotMet(SecAggError):
    """Fewer than ``threshold`` parties remain: the round fails and nothing may be applied."""


class OverflowRisk(ProtocolError):
    """The fixed-point encoding could wrap around the modulus for the number of clients asked for."""


class CkksError(SecAggError):
    """A CKKS context or ciphertext is unusable: wrong parameters, a secret key where none may be, bad
    bytes."""
