"""lnjax: lifelong (sequential) model editing with Lifelong Normalization, in JAX."""

from . import editors, ln, solve
from .editors import Editor, EditorState
from .features import Features

__version__ = "0.1.0"
