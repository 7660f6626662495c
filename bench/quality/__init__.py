"""Does SamToNe help? Small, reproducible retrieval experiments on real text, with the paper's probes.

    python -m bench.quality                # frozen encoders + trainable towers, random batches -> QUALITY.md
    python -m bench.quality --repeated     # batches where documents repeat, group masking -> REPEATED.md
    python -m bench.quality --finetune     # fine-tune MiniLM itself through SamToNeRankingLoss -> FINETUNE.md
    python -m bench.quality --quick        # any of them, small and fast, into a scratch folder

Task (CodeSearchNet-style, built from source code installed packages ship, nothing downloaded): the
query is a sentence of a function's docstring (the first one, unless a document has several queries),
the document is the function's code with the docstring removed. Training pairs come from third-party
packages (numpy, scipy, torch, scikit-learn, transformers, ...), test pairs from the Python standard
library of the running interpreter (tests, demos and generated modules excluded), so no file is in
both.

Modules: ``data`` (pairs, group ids, batch layouts, frozen embeddings), ``models`` (towers, training,
fine-tuning, metrics), ``report`` (tables, intervals, plots, the Markdown reports), ``cli`` (the
three experiments and their command line).
"""
