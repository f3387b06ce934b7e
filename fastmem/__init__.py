"""fastmem: fast memory for frozen language models, the helper package of the fastmem book.

One module per concept the book explains; each public function's docstring names its chapter.
"""

import warnings

__version__ = "0.1.0"

# tqdm's notebook bars need ipywidgets, which the static book cannot show; plain bars are kept.
warnings.filterwarnings("ignore", message="IProgress not found")
