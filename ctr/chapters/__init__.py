"""One module per chapter of the book, named as its notebook (``book/<name>.ipynb``)."""
