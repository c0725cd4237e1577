"""Data layer: turn user input into validated float64 matrices and hold the predict-time schema.

Accepted feature inputs are numpy arrays (and lists of lists), pandas, polars and pyarrow frames,
and CSV or Parquet data by path (a file, a folder, a Hive-partitioned folder, an ``s3://``
address). The ordinal target is resolved into integer codes ``0..K-1``
(:class:`TargetEncoding`), categorical features are one-hot encoded with the first level as the
reference (:class:`FeatureSchema`), and every user mistake is reported as a one-sentence
:class:`~fedgrain.exceptions.DataError` (or :class:`~fedgrain.exceptions.DataTypeError`) that says
what is wrong, where, and how to fix it. Row numbers in messages count from 0.

The modules: ``target`` (ordinal levels and label validation), ``features`` (encoding,
validation and the feature schema), ``dataset`` (the one reader of CSV and Parquet files,
folders, Hive partitions and remote file systems, on ``pyarrow.dataset``), ``files`` (frames
and tables as input, files read whole or in batches, the target column),
``prepare`` (training and prediction data, put together from the three), ``streamed`` (training
data read batch by batch), ``fitdata`` (:class:`FitData`, what both kinds of
preparation return) and ``_common`` (helpers they share).
"""

from fedgrain.exceptions import ComplexDataError

from .dataset import DatasetSource
from .features import FeatureSchema
from .files import iter_table, read_table, split_target
from .prepare import FitData, prepare_data, prepare_fit, prepare_predict
from .streamed import ParquetSource
from .target import TargetEncoding

__all__ = [
    "ComplexDataError",
    "DatasetSource",
    "FeatureSchema",
    "FitData",
    "ParquetSource",
    "TargetEncoding",
    "prepare_data",
    "prepare_fit",
    "prepare_predict",
    "iter_table",
    "read_table",
    "split_target",
]
