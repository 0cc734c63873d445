"""Data sets held as in-memory tensors, a name registry, batching and augmentation.

Importing this package registers the image data sets (:mod:`locallearn.data.vision`)
and, when present, the text ones (:mod:`locallearn.data.text`): a module registers a
loader with ``@register_dataset("name", "one-line help")``.
"""

from importlib import import_module
from importlib.util import find_spec

from locallearn.data import vision as vision
from locallearn.data.augment import Augment
from locallearn.data.cache import cache_dir
from locallearn.data.core import (
    DATASET_HELP,
    DATASETS,
    ArrayData,
    DataError,
    DataSplits,
    batches,
    load_data,
    register_dataset,
    resolve_data_dir,
)

# Text data sets live in their own module, written separately; load it if it exists.
if find_spec(f"{__name__}.text") is not None:
    import_module(f"{__name__}.text")

__all__ = [
    "DATASETS",
    "DATASET_HELP",
    "ArrayData",
    "Augment",
    "DataError",
    "DataSplits",
    "batches",
    "cache_dir",
    "load_data",
    "register_dataset",
    "resolve_data_dir",
]
