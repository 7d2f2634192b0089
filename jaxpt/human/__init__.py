"""Human evaluation: export pairs of responses as one self-contained HTML page that
annotators fill in (mouse or keyboard) and save as jsonl; read any number of saved files
back into Bradley-Terry and Elo ratings with bootstrap CIs and annotator agreement."""

from jaxpt.human.export import export_page, page_items, read_pairs, render_page
from jaxpt.human.results import agreement, comparisons, read_results, summarize, winner

__all__ = [
    "agreement",
    "comparisons",
    "export_page",
    "page_items",
    "read_pairs",
    "read_results",
    "render_page",
    "summarize",
    "winner",
]
