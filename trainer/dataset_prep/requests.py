"""The options of kohya's folder preparation, each declared once: the Dataset Preparation tab
builds its widgets from them and ``prepare_training_folders`` takes its defaults and minimums."""
from __future__ import annotations

from pydantic import BaseModel

from trainer.settings.field import option


class PrepareRequest(BaseModel):
    repeats: int = option(40, label="Repeats", ge=1, help="how often each training image is seen per epoch")
    reg_repeats: int = option(1, label="Repeats", ge=0, help="how often each regularisation image is seen per epoch")
    merge: bool = option(False, label="Add to existing folders")
