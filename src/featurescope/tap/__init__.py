"""FeatureTap: any layer's true outputs by graph-node name, and whole datasets streamed to disk.

``FeatureTap(model, return_nodes)`` takes ``return_nodes`` exactly as torchvision's
``create_feature_extractor`` does. It runs one of two backends behind one small interface, a
torch.fx program (``_fx``) or forward hooks (``_hooks``); ``_inplace`` finds the nodes a later
in-place op would overwrite, ``_extract`` streams a dataset through the tap and ``_store`` keeps
what it writes on disk; :mod:`~featurescope.tap.gradcam` weighs a node's maps by their
gradients (Grad-CAM); ``_receptive`` finds each node's exact receptive field on the graph. The tap knows nothing of the zoo's registry: it reads what a model is only
through :func:`featurescope.model_metadata`.
"""

from featurescope.tap._fold import Accumulator, fold
from featurescope.tap._nodes import tappable_nodes
from featurescope.tap._receptive import ReceptiveField, receptive_field, receptive_fields
from featurescope.tap._store import Extraction, load_features, merge_features
from featurescope.tap._tap import FeatureTap, NodeSummary, get_graph_node_names
from featurescope.tap.gradcam import GradCam, grad_cam, last_spatial_node

__all__ = [
    "Accumulator",
    "Extraction",
    "FeatureTap",
    "GradCam",
    "NodeSummary",
    "ReceptiveField",
    "fold",
    "get_graph_node_names",
    "grad_cam",
    "last_spatial_node",
    "load_features",
    "merge_features",
    "receptive_field",
    "receptive_fields",
    "tappable_nodes",
]
