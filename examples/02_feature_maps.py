"""
Feature maps, stage by stage
============================

The study regrouped AlexNet into stages ``conv1``, ``conv2``, ``conv3`` and ``fc`` and pulled out
each stage's output with torchvision's ``create_feature_extractor``. :class:`featurescope.FeatureTap`
takes the same ``return_nodes``, so the study's snippet changes by one line, and it returns the
true output of every node even where a later in-place ReLU overwrites it.
"""

# %%
# The trained full-width network
# ------------------------------
# Reuses the run of the first example (or trains it, if that has not run).
import dataclasses

import torch

import featurescope as fs
from featurescope.study import compare_widths, example_parser, open_study_data
from featurescope.train.presets import get_preset

args = example_parser(__doc__).parse_args()
preset = dataclasses.replace(get_preset(args.preset), models=("alexnet",))
splits = open_study_data(args.data, preset)
run = compare_widths(splits, preset, out=args.out / "checkpoints")[0]
model = run.load_best().eval()

# %%
# Tap each stage
# --------------
# The study's ``create_feature_extractor(model, return_nodes=...)``, with FeatureTap:
return_nodes = {"conv1": "output1", "conv2": "output2", "conv3": "output3", "fc": "output4"}
tap = fs.FeatureTap(model, return_nodes)

test = splits.test or splits.eval
image, label = test[0]
with torch.inference_mode():
    maps = tap(image.unsqueeze(0))
for alias, tensor in maps.items():
    print(alias, list(tensor.shape[1:]))
print("true class:", splits.classes[label])
print("predicted:", splits.classes[int(maps["output4"].argmax())])

# %%
# Every channel, and the sum over channels
# ----------------------------------------
figures = {}
for stage, alias in (("conv1", "output1"), ("conv2", "output2"), ("conv3", "output3")):
    stage_map = maps[alias][0]
    title = f"{stage} {list(stage_map.shape)}"
    grid = fs.visualize("grid", stage_map, max_channels=None, title=title, panel_size=0.6)
    fs.visualizers.save(grid, args.out / f"{stage}_grid.png")
    summed = fs.visualize("sum", stage_map, title=f"{title}, summed over channels")
    fs.visualizers.save(summed, args.out / f"{stage}_sum.png")
    figures[stage] = (grid, summed)

# %%
# In-place safety
# ---------------
# ``conv1.0`` is the convolution before ``ReLU(inplace=True)``. torchvision's extractor returns
# the values the ReLU left behind; FeatureTap returns what the convolution computed.
from torchvision.models.feature_extraction import create_feature_extractor

with torch.inference_mode():
    ours = fs.FeatureTap(model, ["conv1.0"])(image.unsqueeze(0))["conv1.0"]
    theirs = create_feature_extractor(model, ["conv1.0"])(image.unsqueeze(0))["conv1.0"]
    truth = model.conv1[0](image.unsqueeze(0))
print(
    "negative values  FeatureTap:", int((ours < 0).sum()), " torchvision:", int((theirs < 0).sum())
)
print("FeatureTap equals the convolution:", torch.equal(ours, truth))
