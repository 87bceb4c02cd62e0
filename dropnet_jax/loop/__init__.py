"""The one iterative loop (reset to θ0, mask, train, score, drop): the resumable driver (`driver`) and the
methods it runs, DropNet's Algorithm 1 (`dropnet`), weight magnitude pruning (`magnitude`) and structured
pruning at init (`structured`)."""
