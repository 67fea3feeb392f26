"""lnjax: lifelong (sequential) model editing with Lifelong Normalization, in JAX."""

from . import batching, editors, hf, ln, models, presets, probe, sequence, solve
from .editors import Editor, EditorState
from .features import Features
from .probe import TurnBatch
from .sequence import SequenceResult, edit_sequence

__version__ = "0.1.0"
