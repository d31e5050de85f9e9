"""Output processing: sanitize -> detect_format -> parse -> validate -> post_process.

See engine/output/pipeline.py for the flow and docs/output.md for the whole story.
"""

from engine.output.build import build_output_processor
from engine.output.pipeline import OutputProcessor, OutputStages, OutputStream
from engine.output.types import (
    Finding,
    OutputRequest,
    ProcessedOutput,
    QualityMetrics,
    RawOutput,
    StreamDelta,
)

__all__ = [
    "Finding",
    "OutputProcessor",
    "OutputRequest",
    "OutputStages",
    "OutputStream",
    "ProcessedOutput",
    "QualityMetrics",
    "RawOutput",
    "StreamDelta",
    "build_output_processor",
]
