"""Joint training on everything seen so far: the upper bound every method is measured against."""

from torch.utils.data import ConcatDataset, Dataset

from lifelong_moe.methods.base import ContinualMethod
from lifelong_moe.stream import Experience


class Joint(ContinualMethod):
    """Continues from the current weights on the union of experiences 0..i (not from scratch).

    Continuing is cheaper than retraining and reaches the same bound in practice; R's row i is
    still the accuracy of a model that has seen all data of 0..i with no ordering constraint.
    """

    def train_dataset(self, exp: Experience) -> Dataset:
        return ConcatDataset([e.train for e in self.seen])
