"""Sphinx configuration for featurescope's documentation.

Build (warnings are errors, as in tox and CI)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Nothing here needs the network: no intersphinx, no remote images, no downloads in the gallery.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

# Document the checkout, not whatever featurescope happens to be installed.
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(DOCS / "_ext"))

# Examples run inside this process by sphinx-gallery, with their default (quick) preset; they
# write their files under FEATURESCOPE_EXAMPLES_OUT instead of the source tree, and the later
# ones reuse the first one's trained models from there. Installed third-party plugins must not
# change what the docs show.
os.environ["FEATURESCOPE_EXAMPLES_OUT"] = str(DOCS / "_build" / "examples-out")
os.environ["FEATURESCOPE_DISABLE_PLUGIN_AUTOLOAD"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")

import featurescope_gallery

import featurescope

project = "featurescope"
author = "The featurescope developers"
copyright = "2026, The featurescope developers"
release = featurescope.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
    # Markdown (the benchmark tables under benchmarks/) through ``.. include:: :parser:``.
    "myst_parser",
    # The CLI reference, generated from featurescope.cli.build_parser() (docs/cli.rst).
    "sphinx_argparse_cli",
    "featurescope_docs",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
# The benchmark scripts write their Markdown with "#" for the page and "###" for each table;
# included under a section of benchmarks.rst, the jump is intended.
suppress_warnings = ["myst.header"]
templates_path = ["_templates"]
root_doc = "index"
default_role = "py:obj"
pygments_style = "sphinx"
pygments_dark_style = "monokai"

# -- API reference ---------------------------------------------------------------------------
autosummary_generate = True
autosummary_generate_overwrite = True
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
python_maximum_signature_line_length = 88
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Attributes: sections become fields, so a documented property of the same name is no duplicate.
napoleon_use_ivar = True
napoleon_attr_annotations = True

# -- HTML ------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"featurescope {release}"
html_static_path: list[str] = []
html_theme_options = {"source_repository": "", "navigation_with_keys": True}
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True

# -- Example gallery -------------------------------------------------------------------------
# The numbered examples (01_, 02_, ...) are run and their figures embedded. Until examples/ has
# a GALLERY_HEADER.rst the gallery is replaced by a placeholder page, so the build never fails
# for want of examples.
if featurescope_gallery.has_gallery(ROOT / "examples"):
    extensions.append("sphinx_gallery.gen_gallery")
    sphinx_gallery_conf = {
        "examples_dirs": "../examples",
        "gallery_dirs": "auto_examples",
        "filename_pattern": r"/0\d_",
        "ignore_pattern": r"__init__\.py|/_",
        "within_subsection_order": "FileNameSortKey",
        # Visualizers draw without pyplot, so the stock matplotlib scraper would miss them.
        "image_scrapers": ("featurescope_gallery.scraper",),
        "reset_modules": ("featurescope_gallery.reset",),
        "download_all_examples": False,
        "remove_config_comments": True,
        "show_memory": False,
        "show_signature": False,
        "capture_repr": (),
        "first_notebook_cell": None,
        "plot_gallery": "True",
        "abort_on_example_error": False,
        "only_warn_on_example_error": False,
    }
else:
    featurescope_gallery.write_placeholder(DOCS / "auto_examples")
