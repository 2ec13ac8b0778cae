"""One module per dashboard page; each exposes ``view(state) -> Panel viewable``."""
