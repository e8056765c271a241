"""Collection rules for `pytest src tests`: doctests of modules whose optional extra is not
installed are skipped (their tests in tests/ skip with the reason)."""

import importlib.util

collect_ignore = []
if importlib.util.find_spec("transformers") is None:  # the `hf` extra
    collect_ignore.append("src/offramp/models/hf.py")
