"""The explorer's data (plain structures) and its templates, shared by every page.

:func:`build_explorer_data` computes what the explorer shows of an image search (queries,
neighbours, maps, Grad-CAM, the 2-D projection, retrieval scores, units) as a plain, JSON-able
:class:`ExplorerData`; :func:`write_explorer` renders it into one offline HTML page and
:func:`write_units_page` writes the Units section alone for any model and images. Every page
(the static explorer, the units page, the demo's report, the app) is drawn from the package
templates with one stylesheet, :func:`stylesheet`.
"""

from featurescope.pages._build import build_explorer_data, gallery_images, metric_rows
from featurescope.pages._encode import packed
from featurescope.pages._projection import PROJECTIONS, pca_2d, project_2d
from featurescope.pages._render import (
    inert_json,
    render,
    render_explorer,
    render_units_page,
    script_hash,
    stylesheet,
    stylesheet_path,
)
from featurescope.pages._schema import (
    ExplorerData,
    GalleryImage,
    MapEntry,
    Projection,
    Query,
    Run,
    SimilarityTable,
    Stage,
    Unit,
    UnitExample,
    Units,
    UnitSource,
    UnitStage,
    Wording,
)
from featurescope.pages._units import UnitsSpec, build_units
from featurescope.pages._words import weights_sentence
from featurescope.pages._write import (
    query_images,
    read_explorer_data,
    write_explorer,
    write_units_page,
)

__all__ = [
    "PROJECTIONS",
    "ExplorerData",
    "GalleryImage",
    "MapEntry",
    "Projection",
    "Query",
    "Run",
    "SimilarityTable",
    "Stage",
    "Unit",
    "UnitExample",
    "UnitSource",
    "UnitStage",
    "Units",
    "UnitsSpec",
    "Wording",
    "build_explorer_data",
    "build_units",
    "gallery_images",
    "inert_json",
    "metric_rows",
    "packed",
    "pca_2d",
    "project_2d",
    "query_images",
    "read_explorer_data",
    "render",
    "render_explorer",
    "render_units_page",
    "script_hash",
    "stylesheet",
    "stylesheet_path",
    "weights_sentence",
    "write_explorer",
    "write_units_page",
]
