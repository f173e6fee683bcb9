"""nx46vx: resumable surface detection for the Vesuvius Challenge, in one call.

>>> import nx46vx
>>> result = nx46vx.run(input_roots=["/kaggle/input"], profile="kaggle-train")  # doctest: +SKIP
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nx46vx")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"

from .config import RunConfig, load_config
from .errors import Nx46Error
from .predict import Prediction, export_nnunet, predict
from .runner import RunResult, run

__all__ = ["Nx46Error", "Prediction", "RunConfig", "RunResult", "__version__", "export_nnunet", "load_config", "predict", "run"]
