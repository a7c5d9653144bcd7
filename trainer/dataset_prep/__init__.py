"""Dataset preparation: kohya's folder builder, caption editing, tag frequencies, reg image counts.

No GUI code here; every function returns a dataclass with a ``summary`` (or
``describe()``) text for the GUI to show, and raises ``DatasetPrepError`` with a
message saying what to change when a request is refused.
"""
from .layout import DatasetPrepError, concept_folder_name, folder_settings, reg_folder_name
from .prepare import ConceptResult, PrepareResult, prepare_training_folders

__all__ = [
    "DatasetPrepError", "concept_folder_name", "folder_settings", "reg_folder_name",
    "ConceptResult", "PrepareResult", "prepare_training_folders",
]
