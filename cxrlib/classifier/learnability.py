"""The learnability check of notebook 01: is the prepared cohort a real test?

A small classifier is trained on (up to ``data_check.max_train_images``) internal training
images and scored on the internal test split and every external site's test split. On the
phantom cohort the internal macro AUROC should be clearly above chance but far from 1 (about
0.80 for a ResNet-18 on 2,000 images, about 0.65 for the demo's tiny ConvNeXt on 1,000) and
clearly lower on the external sites, which is what makes the cohort useful for studying
synthetic supplementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cxrlib.classifier.training import TrainResult, predict, predictions_frame, train_classifier
from cxrlib.core.cohort import split_rows, test_sets
from cxrlib.core.schema import Params
from cxrlib.data.imagecache import ImageCache
from cxrlib.stats import auroc_table, macro_auroc


@dataclass
class LearnabilityCheck:
    training: TrainResult
    predictions: pd.DataFrame
    per_label: pd.DataFrame
    macro: pd.DataFrame


def learnability_check(params: Params, manifest: pd.DataFrame, cache: ImageCache,
                       progress: bool = True) -> LearnabilityCheck:
    """Train on internal train rows, early-stop on internal val, test on every test split."""
    train = split_rows(manifest, params.internal_sites(), "train")
    if len(train) > params.data_check.max_train_images:
        rng = np.random.default_rng(params.run.seed)
        keep = np.sort(rng.choice(len(train), params.data_check.max_train_images, replace=False))
        train = train.iloc[keep]
    val = split_rows(manifest, params.internal_sites(), "val")
    result = train_classifier(params.classifier, train, val, cache, params.run.seed, progress)
    predictions = pd.concat([predictions_frame(test, predict(result.model, test, cache), name)
                             for name, test in test_sets(params, manifest).items()],
                            ignore_index=True)
    per_label = auroc_table(predictions)
    return LearnabilityCheck(result, predictions, per_label, macro_auroc(per_label))
