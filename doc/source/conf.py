"""Sphinx configuration of the rapid-vmm documentation (``tox -e docs``).

The pages are Markdown (MyST, ``myst_parser``); the configuration reference
is rendered from the options themselves (``oslo_config.sphinxext``,
``configuration.rst``) and the release notes from ``releasenotes/notes``
(``reno.sphinxext``, ``releasenotes.rst``). Built with warnings as errors:
``sphinx-build -W -b html doc/source doc/build/html``.
"""

project = 'rapid-vmm'
copyright = 'rapid-vmm developers'  # noqa: A001 - Sphinx's name
author = 'rapid-vmm developers'

extensions = [
    'myst_parser',
    'oslo_config.sphinxext',
    'reno.sphinxext',
]

source_suffix = {
    '.rst': 'restructuredtext',
    '.md': 'markdown',
}
root_doc = 'index'
exclude_patterns = ['_build']

# Markdown: `#section` links to the headings of every page (levels 1-4).
myst_heading_anchors = 4
myst_enable_extensions = ['colon_fence']

html_theme = 'alabaster'
html_title = 'rapid-vmm'
html_static_path: list[str] = []

