"""Row selection and subgroups (:mod:`cxrlib.core.cohort`) that need no cohort on disk; the seeded
draws on the smoke cohort are tested with the grid (test_experiments) and sampling."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxrlib.core.cohort import age_band


def test_age_band():
    bands = age_band([12, 39.9, 40, 59.5, 60, 79, 80, 101, np.nan])
    assert bands.iloc[:8].tolist() == ["<40", "<40", "40-59", "40-59", "60-79", "60-79", "80+",
                                       "80+"]
    assert pd.isna(bands.iloc[8])
