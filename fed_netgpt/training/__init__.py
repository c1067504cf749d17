"""How a site trains: one engine (`engine.train_sites`) for every kind of training, its batches and losses, DP-SGD's
accounting and noise (`privacy`), Ditto's personal pass (`personalization`), and the reference engines that the
equivalence tests hold the engine to (`reference`)."""
