"""
Search by image
===============

The AlexNet paper's claim: images whose last-hidden-layer vectors (2048-d, after the second fully
connected layer's ReLU) are close in Euclidean distance look alike. This script embeds the
training images with the trained network, indexes them in an exact
:class:`featurescope.EmbeddingIndex`, and shows each query's ten nearest training images.
"""

# %%
# Embed the training set
# ----------------------
import dataclasses

import featurescope as fs
from featurescope.study import (
    compare_widths,
    embed,
    example_parser,
    first_query_per_class,
    index_embeddings,
    open_study_data,
)
from featurescope.train.presets import get_preset

args = example_parser(__doc__).parse_args()
preset = dataclasses.replace(get_preset(args.preset), models=("alexnet",))
splits = open_study_data(args.data, preset)
model = compare_widths(splits, preset, out=args.out / "checkpoints")[0].load_best()

gallery = embed(model, splits.train)  # the node "fc.4", flattened
index = index_embeddings(gallery)  # ids: dataset indices, labels, and image paths as metadata
print(index)

# %%
# Query with test images
# ----------------------
queries = embed(model, splits.test or splits.eval)
rows = first_query_per_class(queries.labels)
k = min(10, len(index))
result = index.search(queries["embedding"][rows], k)
for row, labels, distances in zip(rows, result.labels, result.distances, strict=True):
    hits = [f"{splits.classes[label]} {d:.3g}" for label, d in zip(labels, distances, strict=True)]
    print(queries.paths[row], "->", hits)

figure = fs.visualize(
    "montage",
    result,
    images=dict(zip(index.ids.tolist(), index.metadata, strict=True)),
    queries=[queries.paths[r] for r in rows],
    labels=dict(zip(index.ids.tolist(), index.labels.tolist(), strict=True)),
    query_labels=[int(queries.labels[r]) for r in rows],
    class_names=splits.classes,
    title=f"each query, then its {k} nearest training images",
)
fs.visualizers.save(figure, args.out / "retrieval_montage.png")

# %%
# How often are the neighbours of the same class?
# -----------------------------------------------
scores = fs.index.retrieval_metrics(index, queries["embedding"], queries.labels, k=k)
print({name: round(value, 3) for name, value in scores.items()})
