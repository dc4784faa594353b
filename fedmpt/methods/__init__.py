"""Methods over frozen CLIP features: FedMPT, its ablations and the baselines, behind one interface.

Importing this package registers every built-in method in :data:`fedmpt.methods.base.METHODS`.
"""

from fedmpt.methods import baselines, fedmpt
from fedmpt.methods.base import METHODS, Method, MethodConfig, build_method, register_method

__all__ = ["METHODS", "Method", "MethodConfig", "baselines", "build_method", "fedmpt", "register_method"]
