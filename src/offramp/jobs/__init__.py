"""The job layer: one config in, files out, progress shown.

Each module is one ``offramp`` command — :mod:`~offramp.jobs.train`,
:mod:`~offramp.jobs.place`, :mod:`~offramp.jobs.evaluate` (``evaluate`` and ``calibrate``),
:mod:`~offramp.jobs.demo` (on :mod:`~offramp.jobs.experiment`) — with the run directory's files
in :mod:`~offramp.jobs.run_files` and config files in :mod:`~offramp.jobs.config`. Only this
layer and :mod:`offramp.cli` read environment variables or decide where files go; library
modules never import it.
"""

from offramp.jobs.run_files import load_gates, load_model, load_model_and_gates

__all__ = ["load_gates", "load_model", "load_model_and_gates"]
