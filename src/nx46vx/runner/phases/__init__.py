"""One module per phase, each with the protocol of :class:`~nx46vx.runner.phases.base.Phase`."""

from .base import Phase
from .discovery import DiscoveryPhase
from .distillation import DistillationPhase
from .features import FeaturesPhase
from .packaging import PackagingPhase, RunResult, model_digest
from .search import SearchPhase
from .segmentation import SegmentationPhase

__all__ = ["DiscoveryPhase", "DistillationPhase", "FeaturesPhase", "PackagingPhase", "Phase", "RunResult", "SearchPhase", "SegmentationPhase", "model_digest"]
