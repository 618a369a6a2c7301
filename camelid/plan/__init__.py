"""Planning before a run: scaling laws (how big, how many tokens), memory (what a run needs), fit (what fits a device).

Imports only config: a model's shapes are enough, no model is built; nothing of train or cli."""
