"""lnjax: lifelong (sequential) model editing with Lifelong Normalization, in JAX.

    import lnjax as lx
    ed = lx.editors.stableedit(lr=1e-6, alpha=10.0)
    state = ed.init({"model.layers.29.mlp.down_proj": (14336, 4096)})
    deltas, state = ed.update({"model.layers.29.mlp.down_proj": lx.Features(keys=K, value_grads=G)}, state)
"""

from . import batching, checkpoint, data, editors, eval, hf, ln, models, presets, probe, sequence, sharding, solve
from . import world, world_model
from . import baselines, ft, key_stats, locate
from .editors import Editor, EditorState
from .features import Features
from .probe import TurnBatch
from .sequence import SequenceResult, edit_sequence

__version__ = "0.1.0"
