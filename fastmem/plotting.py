"""One figure style for the whole book, and figures that name their model and parameters."""

from __future__ import annotations

import matplotlib.pyplot as plt
import seaborn as sns

from .book import run_label


def use_book_style() -> None:
    """Set the style every chapter's figures share (call once, in the set-up cell)."""
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    plt.rcParams.update({"figure.figsize": (7.0, 4.0), "figure.dpi": 100, "savefig.dpi": 110,
                         "axes.titlesize": 11, "figure.titlesize": 11})


def label_figure(fig, title: str, model_label: str, param_set: str):
    """Title ``fig`` with what it shows and the model and parameter set that produced it."""
    fig.suptitle(f"{title}\n{run_label(model_label, param_set)}")
    fig.tight_layout()
    return fig
