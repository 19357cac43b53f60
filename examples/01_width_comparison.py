"""
Width: the full AlexNet against its single-GPU half
===================================================

The study halved every conv layer of AlexNet (96-256-384-384-256 becomes 48-128-192-192-128,
one GPU's half of the original) and compared training curves at batch sizes 8 and 16. This
script trains both widths with a :mod:`featurescope.train.presets` recipe and draws the curves.

``--preset quick`` (the default) learns in minutes on a CPU; ``--preset study`` runs the study's
schedule: SGD with momentum, lr 0.01 up to epoch 18 and 0.003 after, 150 epochs, batch sizes
8 and 16.
"""

# %%
# Data and recipe
# ---------------
import featurescope as fs
from featurescope.study import compare_widths, example_parser, open_study_data
from featurescope.train.presets import get_preset

args = example_parser(__doc__).parse_args()
preset = get_preset(args.preset)
splits = open_study_data(args.data, preset)
print(f"{len(splits.train)} training images, classes {splits.classes}")
print(preset.description)

# %%
# Train both widths
# -----------------
# Each run keeps its checkpoints under ``out/checkpoints/<model>-bs<batch size>``; running the
# script again resumes or reuses them.
runs = compare_widths(splits, preset, out=args.out / "checkpoints")
for run in runs:
    params = sum(p.numel() for p in fs.create_model(run.model).parameters())
    print(
        f"{run.name:<18} {params:>11,} params   best val acc {run.history.best_val_acc:.3f}"
        f"   final train loss {run.history.train_loss[-1]:.3f}"
    )

# %%
# Training curves
# ---------------
figure = fs.visualize(
    "curves", {run.name: run.history.to_dict() for run in runs}, title="AlexNet, full vs half"
)
fs.visualizers.save(figure, args.out / "width_curves.png")
