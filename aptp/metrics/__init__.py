"""Quality metrics: FID, CLIP score, CMMD (the paper's), their distances, evaluation protocols and
a helper that computes several metrics on one image set.

    from aptp.metrics import build_metrics, evaluate
    metrics = build_metrics([{"name": "clip_score", "model": "/models/clip-vit-base-patch32"}])
    evaluate(images, prompts, metrics)          # {"clip_score": 31.2}
"""

from aptp.metrics.frechet import feature_statistics, frechet_distance, frechet_distance_features
from aptp.metrics.suite import build_metrics, evaluate, metric_name
from aptp.metrics.mmd import mmd

__all__ = [
    "build_metrics",
    "evaluate",
    "metric_name",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_features",
    "mmd",
]
