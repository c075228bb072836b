"""Data sets in, batches out: format, verification, preprocessing, sampling, augmentation."""

from lightseg.data.dataset import Case, Dataset, DatasetSpec, load_dataset, read_dataset_json
from lightseg.data.synthetic import make_synthetic_dataset

__all__ = ["Case", "Dataset", "DatasetSpec", "load_dataset", "read_dataset_json", "make_synthetic_dataset"]
