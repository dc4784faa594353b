"""Multi-label datasets: canonical class lists, file-format loaders and the dataset registry.

``load_dataset(name, root, split, ...)`` is the one entry point; ``DATASETS`` lists what is registered.
Importing this package registers the built-in loaders: voc2007, coco2014, coco2017, nuswide, chestxray14,
bigearthnet, mlrsnet and the generic csv.
"""

from fedmpt.data import bigearthnet, chestxray14, coco, csv_labels, mlrsnet, nuswide, voc2007
from fedmpt.data.classnames import BUILTIN_CLASSNAMES
from fedmpt.data.dataset import ArrayImageDataset, ImageFileDataset, MultiLabelDataset, check_same_classnames
from fedmpt.data.labels import NEGATIVE, POSITIVE, UNKNOWN
from fedmpt.data.registry import DATASETS, load_dataset, register_dataset

__all__ = [
    "BUILTIN_CLASSNAMES",
    "DATASETS",
    "NEGATIVE",
    "POSITIVE",
    "UNKNOWN",
    "ArrayImageDataset",
    "ImageFileDataset",
    "MultiLabelDataset",
    "bigearthnet",
    "check_same_classnames",
    "chestxray14",
    "coco",
    "csv_labels",
    "load_dataset",
    "mlrsnet",
    "nuswide",
    "register_dataset",
    "voc2007",
]

# The synthetic world registers itself as "synthetic"; imported last because it builds on the modules above.
from fedmpt.world import loader as _synthetic_loader  # noqa: E402, F401
