"""rehyat-compile: turn a bidirectional video DiT into ReHyAt's recurrent hybrid attention form."""
from .attention import (HybridState, hybrid_attention_chunked, hybrid_attention_reference,
                        hybrid_attention_step)
from .errors import CheckpointError, ComplexityError, ConversionError, ShapeError
from .feature_map import FeatureMap
from .op import decompositions, hybrid_attention, hybrid_attention_flops
from .export import FrameAxis, export_video_model
from .transform import HybridModel, inspect, transform
from .cost import CostReport, check_linear, cost
from .stream import StreamRunner, stream
from .checkpoint import load_hybrid, save_hybrid
from .distill import DistillReport, distill
from .finetune import FinetuneReport, finetune
from .select import Selection, select_layers
from .build import ArtifactError, build, load  # after .op: the backends import it

__version__ = "0.1.0"

__all__ = [
    "ArtifactError", "CheckpointError", "ComplexityError", "ConversionError", "CostReport", "DistillReport",
    "FeatureMap", "FinetuneReport", "FrameAxis", "HybridModel", "HybridState", "Selection", "ShapeError",
    "StreamRunner", "build", "check_linear", "cost", "decompositions", "distill", "export_video_model", "finetune",
    "hybrid_attention",
    "hybrid_attention_chunked", "hybrid_attention_flops", "hybrid_attention_reference",
    "hybrid_attention_step", "inspect", "load", "load_hybrid", "save_hybrid", "select_layers", "stream",
    "transform",
]
