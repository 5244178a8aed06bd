"""cnnspec: a declarative network-spec compiler for convolutional neural networks."""

from .errors import Problem, SpecError
from .network import Network, load, loads

__version__ = "0.1.0"
__all__ = ["Network", "Problem", "SpecError", "load", "loads", "__version__"]
