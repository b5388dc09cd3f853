"""Applications built on the engine: the demo, the SmolLM2 study, the pruning baselines, the zoo. The engine
never imports them."""
