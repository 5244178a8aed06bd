"""cnnspec: a declarative network-spec compiler for convolutional neural networks."""

from .errors import Problem, SpecError

__version__ = "0.1.0"
__all__ = ["Network", "Problem", "SpecError", "load", "loads", "__version__"]


def __getattr__(name):
    # `cnnspec --help` and other commands that load no spec start without numpy and
    # jsonschema: the network module loads on first use
    if name in ("Network", "load", "loads"):
        from . import network

        return getattr(network, name)
    raise AttributeError(f"module 'cnnspec' has no attribute '{name}'")
