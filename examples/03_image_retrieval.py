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
from featurescope.presets import get_preset
from featurescope.study import compare_widths, embed, example_parser, open_study_data

args = example_parser(__doc__).parse_args()
preset = dataclasses.replace(get_preset(args.preset), models=("alexnet",))
splits = open_study_data(args.data, preset)
model = compare_widths(splits, preset, out=args.out / "checkpoints")[0].load_best()

gallery = embed(model, splits.train)  # the node "fc.4", flattened
index = fs.EmbeddingIndex(gallery["embedding"].shape[1])
index.add(gallery["embedding"], labels=gallery.labels, metadata=gallery.paths)
print(index)

# %%
# Query with test images
# ----------------------
queries = embed(model, splits.test or splits.eval)
rows = [list(queries.labels).index(c) for c in range(len(splits.classes))]  # one per class
k = min(10, len(index))
result = index.search(queries["embedding"][rows], k)
for row, ids, distances in zip(rows, result.ids, result.distances, strict=True):
    hits = [
        f"{splits.classes[int(index.labels[i])]} {d:.3g}"
        for i, d in zip(ids, distances, strict=True)
    ]
    print(queries.paths[row], "->", hits)

figure = fs.visualize(
    "montage",
    result,
    images=dict(enumerate(index.metadata)),
    queries=[queries.paths[r] for r in rows],
    labels=index.labels.tolist(),
    query_labels=[int(queries.labels[r]) for r in rows],
    class_names=splits.classes,
    title=f"each query, then its {k} nearest training images",
)
fs.save_figure(figure, args.out / "retrieval_montage.png")

# %%
# How often are the neighbours of the same class?
# -----------------------------------------------
scores = fs.retrieval_metrics(index, queries["embedding"], queries.labels, k=k)
print({name: round(value, 3) for name, value in scores.items()})
