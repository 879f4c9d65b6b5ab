"""What ships around the library, not the library: tiny models and a character tokenizer built offline
(``tiny``), the demo's addition task (``addition``), the synthetic preference task (``synthetic``), the
demo's plot (``plot``) and the README's config tables (``docs``).

Tests, the demo, the benchmarks and the recipes' demo configs use these; no module of the library
(``rlhf`` outside this package) imports them.
"""
