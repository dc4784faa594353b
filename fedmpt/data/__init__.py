"""Multi-label datasets: canonical class lists, file-format loaders and the dataset registry."""

from fedmpt.data.classnames import BUILTIN_CLASSNAMES

__all__ = ["BUILTIN_CLASSNAMES"]
