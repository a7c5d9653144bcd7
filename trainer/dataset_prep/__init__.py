"""Dataset preparation: kohya's folder builder, caption editing, tag frequencies, reg image counts, balancing.

No GUI code here; every function returns a dataclass with a ``summary`` (or
``describe()``) text for the GUI to show, and raises ``DatasetPrepError`` with a
message saying what to change when a request is refused.
"""
from .balance import BalancePlan, ConceptBalance, apply_balance, plan_balance
from .caption_bulk import AT_END, AT_START, BulkEditResult, add_tags, remove_tags, replace_tag
from .caption_edit import (SOURCE_FILE, SOURCE_FOLDER_NAME, SOURCE_NONE, CaptionEntry, CaptionListing, caption_path,
                           list_captions, read_caption, write_caption)
from .layout import DatasetPrepError, concept_folder_name, folder_settings, reg_folder_name
from .prepare import ConceptResult, PrepareResult, prepare_training_folders
from .reg_count import RegImageCount, count_reg_images
from .tag_stats import TagFrequencies, count_tags, tag_frequencies

__all__ = [
    "BalancePlan", "ConceptBalance", "apply_balance", "plan_balance",
    "AT_END", "AT_START", "BulkEditResult", "add_tags", "remove_tags", "replace_tag",
    "SOURCE_FILE", "SOURCE_FOLDER_NAME", "SOURCE_NONE", "CaptionEntry", "CaptionListing", "caption_path",
    "list_captions", "read_caption", "write_caption",
    "DatasetPrepError", "concept_folder_name", "folder_settings", "reg_folder_name",
    "ConceptResult", "PrepareResult", "prepare_training_folders",
    "RegImageCount", "count_reg_images",
    "TagFrequencies", "count_tags", "tag_frequencies",
]
