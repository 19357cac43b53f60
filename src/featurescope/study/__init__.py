"""The study's three experiments, and the demo and report built from them.

1. :func:`compare_widths`: train both AlexNet widths at each batch size of a preset.
2. :func:`stage_maps`: one image's feature maps at each stage, for the visualizers.
3. :func:`embed` and :func:`index_embeddings`: search by image over the last hidden layer;
   :class:`ImageSearch` bundles the model, its node and preprocessing with the index, and saves
   them as one folder.

:mod:`featurescope.study.demo` runs all three (``featurescope demo``) and
:mod:`featurescope.study.report` writes their HTML report. Nothing here holds logic that the
rest of the library lacks: it assembles the data, zoo, tap, index and visualizers.
"""

from featurescope.study._experiments import (
    WidthRun,
    compare_widths,
    draw_stage_maps,
    embed,
    embed_images,
    embedding_node,
    example_parser,
    first_query_per_class,
    index_embeddings,
    open_study_data,
    preprocess_image,
    stage_maps,
    train_run,
)
from featurescope.study._search import ImageSearch, weights_sentence
from featurescope.study.explorer import write_explorer

__all__ = [
    "ImageSearch",
    "WidthRun",
    "compare_widths",
    "draw_stage_maps",
    "embed",
    "embed_images",
    "embedding_node",
    "example_parser",
    "first_query_per_class",
    "index_embeddings",
    "open_study_data",
    "preprocess_image",
    "stage_maps",
    "train_run",
    "weights_sentence",
    "write_explorer",
]
