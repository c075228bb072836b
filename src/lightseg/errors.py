"""One exception type per failure kind, so the CLI can turn each into a clear message.

Every message names the file or case involved and says what to do; the CLI prints it without a
traceback and exits non-zero.
"""


class LightsegError(Exception):
    """Base of every error that is the user's input, not a bug in lightseg."""


class DatasetError(LightsegError):
    """A raw data set (dataset.json, imagesTr, labelsTr) is missing, malformed or inconsistent."""


class ImageError(LightsegError):
    """An image file cannot be read, or its content (shape, geometry, values) is unusable."""


class PlanError(LightsegError):
    """A plan or preprocessed cache is missing, malformed or does not match the data."""


class ModelError(LightsegError):
    """A model name, its arguments or an input size are not valid for that model."""


class CheckpointError(LightsegError):
    """A checkpoint or run folder cannot be loaded safely."""


class TrainingError(LightsegError):
    """Training cannot go on (for example the loss became NaN)."""


class ConfigError(TrainingError):
    """Training options are invalid, or contradict the stored ``config.json`` of a resumed run."""


class PredictionError(LightsegError):
    """One or more cases could not be predicted."""


class EvaluationError(LightsegError):
    """Predictions and ground truth cannot be compared (missing files, grid mismatch)."""


class WorkerError(LightsegError):
    """A worker process of a multi-process stage was killed (usually for memory) before its cases were done."""


class SettingError(LightsegError):
    """An environment variable lightseg reads (:mod:`lightseg.environment`) has a value it cannot use."""


class OutputError(LightsegError):
    """An output path cannot be written safely: a folder, link or FIFO where a file goes, an input
    it would overwrite, or a run folder another process is training into."""
