"""Edit records and the loaders that read benchmark files into them."""

from .loaders import DataError, load_records, split_records
from .records import EditRecord, Probe

__all__ = ["EditRecord", "Probe", "DataError", "load_records", "split_records"]
