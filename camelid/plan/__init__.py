"""Planning before a run: scaling laws (how big, how many tokens), memory (what a run needs), fit (what fits a device).

Sits above config and model; imports neither train nor cli."""
