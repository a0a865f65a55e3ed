"""The attack rsp trains against and the validation cut it selects on, unless told otherwise, defined once.

TrainConfig starts from these values, later stages fall back on them (through artifacts.SourceRun) for a
source folder whose manifest does not record its attack, and the CLI's help shows them: this module imports
nothing heavy, so `rsp --help` stays fast.
"""

from fractions import Fraction

EPS = 8 / 255  # Linf radius on inputs in [0, 1]: the CIFAR-10 robustness standard
STEP_SIZE = 2 / 255  # PGD step while training: eps / 4
# the validation split cut from the training data (model selection; the test set is evaluated once): a later
# stage re-cuts it from these where a run's manifest does not record its own
VAL_FRACTION = 0.1
SPLIT_SEED = 0


def as_fraction(value: float) -> str:
    """A radius as a user types it: 8/255 for 8 / 255."""
    return str(Fraction(value).limit_denominator(1000))
