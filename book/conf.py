"""Sphinx configuration of the book: the executed notebooks rendered as they are (`make site`).

Built with `sphinx-build -b html book build/site` (see the Makefile). Nothing is executed here
(`make book` runs tools/execute.py first), and nothing is loaded from another host when a page is
viewed: MathJax comes from the sphinx-mathjax-offline package, the theme's assets are in the
wheel, and book/_ext/ppo_book.py fails the build if a page would fetch anything remote.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "The PPO actor loss"
author = "The PPO actor-loss tutorial authors"
copyright = "2026, the PPO actor-loss tutorial authors (prose CC-BY-4.0, code MIT)"

extensions = [
    "myst_nb",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 copied into _static/mathjax: math renders with no network
    "ppo_book",                # solutions behind a toggle; the nothing-remote check
]

root_doc = "index"
exclude_patterns = ["_build", "**/.ipynb_checkpoints", "notebooks/README*"]
suppress_warnings = ["mystnb.unknown_mime_type"]

# The notebooks are committed executed (tools/execute.py); render them as they are.
nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

html_theme = "sphinx_book_theme"
html_title = "The PPO actor loss"
html_last_updated_fmt = None
html_copy_source = False
html_show_sourcelink = False
html_theme_options = {
    "show_navbar_depth": 1,
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "use_repository_button": False,
    "home_page_in_toc": True,
}
